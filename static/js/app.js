// The dashboard: quotes, headlines and provider health, kept live by one WebSocket.

import { LiveStream } from "./connection.js";
import { changeText, clockTime, durationText, priceText, relativeTime, sparkline } from "./format.js";

const MAX_HEADLINES = 200;
const SPARK_POINTS = 60;
const LATE_SECONDS = 60; // an item this long after its publication is shown as late

const $ = (id) => document.getElementById(id);
const quotes = new Map(); // symbol -> {row, prices: number[], last: number}
const headlines = []; // newest first: {key, event, item}
const seen = new Set(); // headline keys already shown
const providers = new Map(); // name -> li
const providerStatus = new Map(); // name -> its latest status, to redraw relative times
let filterText = "";
let quotesAt = null; // when the last quote arrived (Date)

// -- quotes ---------------------------------------------------------------------------------

function quoteRow(symbol) {
  const row = document.createElement("tr");
  row.dataset.symbol = symbol;
  row.innerHTML = `<th scope="row" class="symbol"></th><td class="num price"></td><td class="num change"></td><td class="spark-col"></td>`;
  row.querySelector(".symbol").textContent = symbol;
  const body = $("quotes").tBodies[0];
  const after = [...body.rows].find((other) => other.dataset.symbol > symbol);
  body.insertBefore(row, after || null);
  $("quotes-empty").hidden = true;
  return { row, prices: [], last: null };
}

function showQuote(topic, data) {
  if (!data || typeof data !== "object") return;
  const symbol = data.symbol || topic.split(".").slice(1).join(".");
  const price = Number(data.price);
  if (!symbol || !Number.isFinite(price)) return;
  const quote = quotes.get(symbol) || quoteRow(symbol);
  quotes.set(symbol, quote);
  const { row } = quote;
  const head = row.querySelector(".symbol");
  head.textContent = symbol;
  if (data.name) {
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = data.name;
    head.append(name);
  }
  const priceCell = row.querySelector(".price");
  priceCell.textContent = priceText(price);
  if (quote.last !== null && price !== quote.last) {
    const direction = price > quote.last ? "flash-up" : "flash-down";
    priceCell.classList.remove("flash-up", "flash-down");
    void priceCell.offsetWidth; // restart the animation
    priceCell.classList.add(direction);
  }
  quote.last = price;
  quotesAt = new Date();
  const change = Number(data.change_pct ?? data.change ?? 0);
  const changeCell = row.querySelector(".change");
  changeCell.textContent = changeText(data);
  changeCell.className = `num change ${change > 0 ? "up" : change < 0 ? "down" : ""}`;
  quote.prices.push(price);
  if (quote.prices.length > SPARK_POINTS) quote.prices.shift();
  row.querySelector(".spark-col").replaceChildren(sparkline(quote.prices, change >= 0));
}

// -- headlines ------------------------------------------------------------------------------

function headlineKey(event) {
  const data = event.data || {};
  return `${data.provider || event.topic}:${data.id || event.id}`;
}

function symbolsOf(data) {
  return Array.isArray(data.symbols) ? data.symbols.filter((s) => typeof s === "string") : [];
}

function matches(data) {
  if (!filterText) return true;
  const needle = filterText.toLowerCase();
  const symbols = symbolsOf(data).map((s) => s.toLowerCase());
  if (symbols.includes(needle)) return true;
  return `${data.title || ""} ${data.summary || ""} ${data.source || ""}`.toLowerCase().includes(needle);
}

function headlineItem(event) {
  const data = event.data || {};
  const item = document.createElement("li");
  const safe = typeof data.url === "string" && /^https?:\/\//i.test(data.url);
  const link = document.createElement(safe ? "a" : "span");
  link.className = "headline-title";
  link.textContent = data.title || JSON.stringify(data);
  if (safe) {
    link.href = data.url;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  for (const symbol of symbolsOf(data)) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.textContent = symbol;
    chip.setAttribute("aria-label", `Show only headlines about ${symbol}`);
    chip.addEventListener("click", () => setFilter(symbol));
    meta.append(chip);
  }
  const source = document.createElement("span");
  source.textContent = data.source || event.topic;
  const time = document.createElement("time");
  const published = data.published || new Date(event.ts).toISOString();
  time.dateTime = published;
  time.title = new Date(published).toLocaleString();
  time.textContent = relativeTime(published);
  meta.append(source, time);
  const delay = arrivalDelay(event);
  if (delay) meta.append(delay);
  item.append(link, meta);
  return item;
}

// How long after its publication a headline reached this server: the hub's accept time (ts)
// minus the item's own `published` time. Nothing when the item has no time.
function arrivalDelay(event) {
  const published = Date.parse(event.data?.published || "");
  if (!Number.isFinite(published) || !Number.isFinite(event.ts)) return null;
  const seconds = Math.max(0, event.ts - published) / 1000;
  const delay = document.createElement("span");
  delay.className = seconds >= LATE_SECONDS ? "delay late" : "delay";
  delay.textContent = `+${durationText(seconds)}`;
  delay.title = `Arrived ${durationText(seconds)} after publication: when this server accepted it, minus the time its source published it`;
  return delay;
}

function addHeadline(event, { fresh = true } = {}) {
  const key = headlineKey(event);
  if (seen.has(key)) return;
  seen.add(key);
  const entry = { key, event, item: headlineItem(event), stamp: Date.parse(event.data?.published || "") || event.ts };
  let index = headlines.findIndex((other) => other.stamp < entry.stamp);
  if (index === -1) index = headlines.length;
  headlines.splice(index, 0, entry);
  const list = $("headlines");
  list.insertBefore(entry.item, headlines[index + 1]?.item || null);
  if (fresh) entry.item.classList.add("fresh");
  entry.item.hidden = !matches(event.data || {});
  while (headlines.length > MAX_HEADLINES) {
    const old = headlines.pop();
    seen.delete(old.key);
    old.item.remove();
  }
  updateCounts();
}

function forgetHeadlines() {
  for (const entry of headlines) entry.item.remove();
  headlines.length = 0;
  seen.clear();
  updateCounts();
}

function updateCounts() {
  const shown = headlines.filter((entry) => !entry.item.hidden).length;
  $("headlines-empty").hidden = shown > 0;
  $("headlines-empty").textContent = headlines.length ? "No headline matches the filter." : "Waiting for headlines…";
  $("headline-count").textContent = filterText ? `${shown} of ${headlines.length} headlines match “${filterText}”` : "";
}

function applyFilter() {
  for (const entry of headlines) entry.item.hidden = !matches(entry.event.data || {});
  for (const [symbol, quote] of quotes) quote.row.classList.toggle("picked", filterText.toLowerCase() === symbol.toLowerCase());
  updateCounts();
}

function setFilter(text) {
  $("filter").value = text;
  filterText = text.trim();
  applyFilter();
  $("filter").focus();
}

// -- providers ------------------------------------------------------------------------------

// Push providers (SPEC §7a) hold a connection and report it; polled ones report their polls.
const isPush = (status) => "connected_since" in status || status.kind === "sse" || status.kind === "websocket";
const PUSH_STATE_WORDS = { backoff: "reconnecting" };
const STATE_TITLES = {
  ok: "The last poll succeeded",
  connected: "Connected to its upstream, which pushes new items",
  connecting: "Opening the connection to its upstream",
  backoff: "The connection failed or dropped: waiting before the next attempt",
  failing: "Several attempts in a row failed: still retrying, less often",
  disabled: "Disabled in the configuration",
};

function showProvider(status) {
  if (!status || !status.name) return;
  let item = providers.get(status.name);
  if (!item) {
    item = document.createElement("li");
    item.innerHTML = `<span class="state"></span><span class="provider-name"></span><span class="provider-detail"></span><span class="provider-lag"></span><span class="provider-error"></span>`;
    providers.set(status.name, item);
    const list = $("providers");
    const after = [...list.children].find((other) => other.dataset.name > status.name);
    item.dataset.name = status.name;
    list.insertBefore(item, after || null);
    $("providers-empty").hidden = true;
  }
  providerStatus.set(status.name, status);
  renderProvider(item, status);
}

function renderProvider(item, status) {
  const push = isPush(status);
  item.dataset.lastOk = status.last_ok || "";
  item.dataset.state = status.state;
  item.dataset.mode = push ? "push" : "poll";
  const state = item.querySelector(".state");
  state.textContent = (push && PUSH_STATE_WORDS[status.state]) || status.state;
  state.className = `state state-${status.state}`;
  state.title = STATE_TITLES[status.state] || "";
  item.querySelector(".provider-name").textContent = status.name;
  item.querySelector(".provider-detail").textContent = providerDetail(status);
  const lag = item.querySelector(".provider-lag");
  lag.textContent = lagText(status);
  lag.title = lag.textContent
    ? "Freshness: when this server accepted the provider's newest item, minus the item's own publication time"
    : "";
  lag.classList.toggle("late", typeof status.last_lag === "number" && status.last_lag >= LATE_SECONDS);
  const settled = status.state === "ok" || status.state === "connected";
  const failures = status.consecutive_failures ? ` (${status.consecutive_failures} in a row)` : "";
  item.querySelector(".provider-error").textContent = !settled && status.last_error ? `${status.last_error}${failures}` : "";
}

function providerDetail(status) {
  const parts = [status.kind];
  if (isPush(status)) parts.push(connectionText(status));
  else if (!status.last_ok) parts.push("no successful poll yet");
  else parts.push(`${status.state === "ok" ? "last poll ok" : "last successful poll"} ${relativeTime(status.last_ok)}`);
  parts.push(`${status.items_published} published`);
  if (isPush(status) && status.reconnects) parts.push(`${status.reconnects} reconnect${status.reconnects === 1 ? "" : "s"}`);
  return parts.filter(Boolean).join(" · ");
}

// A push provider's connection, in the words of its state (never a poll's).
function connectionText(status) {
  if (status.state === "connected") return status.connected_since ? `since ${clockTime(status.connected_since)}` : "";
  const lastMessage = status.last_message ? `last message ${relativeTime(status.last_message)}` : "no message yet";
  if (status.state === "disabled") return "not connected";
  if (status.state === "connecting") return lastMessage;
  const next = Date.parse(status.next_poll || "");
  const wait = Number.isFinite(next) ? (next - Date.now()) / 1000 : null;
  const attempt = wait === null ? "" : wait > 0.5 ? `, next attempt in ${durationText(wait)}` : ", next attempt now";
  return `${status.state === "backoff" ? "backoff" : "retrying"}${attempt} · ${lastMessage}`;
}

// How fresh a provider's items are: the lag of the newest one it published.
function lagText(status) {
  if (typeof status.last_lag === "number") return `latest item arrived ${durationText(status.last_lag)} after publication`;
  return status.items_published ? "lag unknown: no item with a publication time" : "";
}

// -- state from HTTP (first load, and after a gap) -----------------------------------------

// For a server with `public = []`: open the page as /#token=<key or JWT>. The fragment never
// leaves the browser; the token is sent only to this server, as a Bearer header or ?token=.
const token = new URLSearchParams(location.hash.slice(1)).get("token");

async function getJSON(path) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { headers });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function refetch() {
  try {
    const [news, statuses, topics] = await Promise.all([
      getJSON("/api/news?limit=100"),
      getJSON("/api/providers"),
      getJSON("/api/topics"),
    ]);
    for (const event of news.headlines.slice().reverse()) addHeadline(event, { fresh: false });
    for (const status of statuses) showProvider(status);
    const quoteTopics = topics.filter((t) => t.topic.startsWith("quotes."));
    const latest = await Promise.all(quoteTopics.map((t) => getJSON(`/api/topics/${encodeURIComponent(t.topic)}`)));
    for (const event of latest) showQuote(event.topic, event.data);
  } catch (error) {
    console.warn("stream: could not refresh the page state", error);
  }
}

// -- wiring ---------------------------------------------------------------------------------

function route(event) {
  if (event.topic === "_system.providers") showProvider(event.data);
  else if (event.topic.startsWith("quotes.")) showQuote(event.topic, event.data);
  else if (event.topic.startsWith("news.")) addHeadline(event, { fresh: !event.snapshot });
  if (!event.snapshot && !event.topic.startsWith("_")) refreshProvidersSoon();
}

function showConnection(state, detail) {
  const badge = $("connection");
  badge.dataset.state = state;
  const words = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…", offline: "offline", refused: "needs a key" };
  badge.textContent = words[state] || state;
  badge.title = detail || "";
  // Down: the quotes are what they were; dim them and say as of when.
  const stale = state !== "live" && quotesAt !== null;
  document.querySelector(".quotes").classList.toggle("stale", stale);
  const asof = $("quotes-asof");
  asof.hidden = !stale;
  if (stale && !asof.textContent) asof.textContent = `as of ${quotesAt.toLocaleTimeString([], { hour12: false })}`;
  if (!stale) asof.textContent = "";
}

// Provider status events come only when a state changes, so the page asks again when new data
// shows a provider has just polled (at most every 2 s), and every 15 s in any case.
const PROVIDERS_REFRESH_MS = 2000;
let providersAskedAt = 0;
let providersTimer = null;

function refreshProvidersSoon() {
  if (providersTimer !== null) return;
  const wait = Math.max(0, providersAskedAt + PROVIDERS_REFRESH_MS - Date.now());
  providersTimer = setTimeout(refreshProviders, wait);
}

async function refreshProviders() {
  providersTimer = null;
  providersAskedAt = Date.now();
  if ($("connection").dataset.state !== "live") return;
  try {
    for (const status of await getJSON("/api/providers")) showProvider(status);
  } catch (error) {
    console.warn("stream: could not refresh providers", error);
  }
}

const live = new LiveStream({
  topics: ["quotes.>", "news.>", "_system.providers"],
  onEvent: route,
  onGap: (gap) => {
    // After a restart the server's ids start over: what the page shows belongs to its old life.
    if (gap.reason === "epoch") forgetHeadlines();
    refetch();
  },
  onState: showConnection,
  token,
});

// Enter in the filter box must not submit the form (no inline handler: the CSP forbids them).
$("filter").form.addEventListener("submit", (submit) => submit.preventDefault());
$("filter").addEventListener("input", (input) => {
  filterText = input.target.value.trim();
  applyFilter();
});
$("clear-filter").addEventListener("click", () => setFilter(""));

setInterval(() => {
  for (const entry of headlines) {
    const time = entry.item.querySelector("time");
    time.textContent = relativeTime(time.dateTime);
  }
  for (const [name, item] of providers) renderProvider(item, providerStatus.get(name));
}, 10000);

setInterval(refreshProviders, 15000);

// Subscribe first, then load what came before: whatever is published in between arrives live
// and the two overlap harmlessly (headlines are de-duplicated by provider and id).
live.start();
refetch();
window.addEventListener("pagehide", () => live.stop());
window.addEventListener("pageshow", (event) => {
  if (event.persisted) live.start(); // back from the back/forward cache: resume from lastId
});
