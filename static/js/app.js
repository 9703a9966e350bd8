// The dashboard: quotes, headlines and provider health, kept live by one WebSocket.

import { LiveStream } from "./connection.js";
import { changeText, clockTime, durationText, priceText, relativeTime, sparkline, wallTime } from "./format.js";

const MAX_HEADLINES = 200;
const SPARK_POINTS = 60;
const LATE_SECONDS = 60; // an item this long after its publication is shown as late
const FLASH_MS = 700; // a price cell's flash: the last tick's direction, gone within a second

const $ = (id) => document.getElementById(id);
const quotes = new Map(); // symbol -> {row, prices: number[], last: number, changedAt: number, flash: timer}
const headlines = []; // newest first: {key, event, item}
const seen = new Set(); // headline keys already shown
const providers = new Map(); // name -> li
const providerStatus = new Map(); // name -> its latest status, to redraw relative times
let filterText = "";
let quotesAt = null; // when the last quote arrived (Date)
let providersAt = null; // when the last provider status arrived (Date)
let down = false; // the page's own socket dropped or was refused: what it shows is not current

// -- quotes ---------------------------------------------------------------------------------

function quoteRow(symbol) {
  const row = document.createElement("tr");
  row.dataset.symbol = symbol;
  row.innerHTML =
    `<th scope="row" class="symbol"><button type="button" class="pick"></button><span class="name"></span></th>` +
    `<td class="num price"><span class="value"></span><time class="changed"></time></td><td class="num change"></td><td class="spark-col"></td>`;
  const pick = row.querySelector(".pick");
  pick.textContent = symbol;
  pick.title = `Show only headlines about ${symbol} (again: show all)`;
  pick.setAttribute("aria-pressed", "false");
  // The whole row picks the symbol; the button is its keyboard and screen-reader handle.
  row.addEventListener("click", (click) => {
    if (click.target.closest("a")) return;
    setFilter(filterText.toLowerCase() === symbol.toLowerCase() ? "" : symbol, { focus: false });
  });
  const body = $("quotes").tBodies[0];
  const after = [...body.rows].find((other) => other.dataset.symbol > symbol);
  body.insertBefore(row, after || null);
  $("quotes-empty").hidden = true;
  return { row, prices: [], last: null, changedAt: null, flash: null };
}

function showQuote(event) {
  const data = event.data;
  if (!data || typeof data !== "object") return;
  const symbol = data.symbol || event.topic.split(".").slice(1).join(".");
  const price = Number(data.price);
  if (!symbol || !Number.isFinite(price)) return;
  const isNew = !quotes.has(symbol);
  const quote = quotes.get(symbol) || quoteRow(symbol);
  quotes.set(symbol, quote);
  const { row } = quote;
  row.querySelector(".name").textContent = data.name || "";
  if (isNew) applyFilter();
  const priceCell = row.querySelector(".price");
  priceCell.querySelector(".value").textContent = priceText(price);
  // One colour rule. The flash: this tick's direction, gone within a second.
  if (quote.last !== null && price !== quote.last) flash(quote, priceCell, price > quote.last ? "up" : "down");
  if (quote.last === null || price !== quote.last) {
    // When it last changed: the server's accept time of the event that changed it.
    quote.changedAt = Number.isFinite(event.ts) ? event.ts : Date.now();
    showChanged(quote);
  }
  quote.last = price;
  quotesAt = new Date();
  // The change column: the day's change.
  const change = Number(data.change_pct ?? data.change ?? 0);
  const changeCell = row.querySelector(".change");
  changeCell.textContent = changeText(data);
  changeCell.className = `num change ${change > 0 ? "up" : change < 0 ? "down" : ""}`;
  // The sparkline: its own first-to-last direction (sparkline() decides).
  quote.prices.push(price);
  if (quote.prices.length > SPARK_POINTS) quote.prices.shift();
  row.querySelector(".spark-col").replaceChildren(sparkline(quote.prices));
}

function flash(quote, cell, direction) {
  clearTimeout(quote.flash);
  cell.classList.remove("flash-up", "flash-down");
  void cell.offsetWidth; // restart the animation
  cell.classList.add(`flash-${direction}`);
  cell.dataset.tick = direction;
  quote.flash = setTimeout(() => cell.classList.remove("flash-up", "flash-down"), FLASH_MS);
}

function showChanged(quote) {
  const time = quote.row.querySelector(".changed");
  if (quote.changedAt === null) return;
  const iso = new Date(quote.changedAt).toISOString();
  if (time.dateTime !== iso) {
    time.dateTime = iso;
    time.title = `Last changed at ${wallTime(iso)}`;
  }
  time.textContent = relativeTime(iso);
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
  if ($("demo").hidden && isDemo(event.data?.provider)) updateDemo();
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
  for (const [symbol, quote] of quotes) {
    const picked = filterText.toLowerCase() === symbol.toLowerCase();
    quote.row.classList.toggle("picked", picked);
    quote.row.querySelector(".pick").setAttribute("aria-pressed", String(picked));
  }
  updateCounts();
}

function setFilter(text, { focus = true } = {}) {
  $("filter").value = text;
  filterText = text.trim();
  applyFilter();
  if (focus) $("filter").focus();
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
    $("providers-toggle").hidden = false;
  }
  providerStatus.set(status.name, status);
  providersAt = new Date();
  renderProvider(item, status);
  renderSummary();
  updateDemo();
}

// While the page's own socket is down, nothing it shows about the providers is current: the
// last known state is dimmed and said to be stale, never "connected" or "ok".
const isStale = () => down && providersAt !== null;

function staleTitle(status) {
  const asof = providersAt ? ` as of ${providersAt.toLocaleTimeString([], { hour12: false })}` : "";
  return `Stale: this page is not connected to the server, so provider states are not updated. Last known${asof}: ${status.state}`;
}

// The one-line summary (shown on a phone): a badge per provider, which opens the full list.
function renderSummary() {
  const badges = [];
  const stale = isStale();
  const prefix = sharedPrefix([...providerStatus.keys()]);
  for (const [name, status] of providerStatus) {
    const badge = document.createElement("span");
    const settled = status.state === "ok" || status.state === "connected";
    const short = name.slice(prefix.length);
    badge.className = `pbadge state-${stale ? "stale" : status.state}`;
    badge.dataset.name = name;
    badge.textContent = stale || settled ? short : `${short} ${(isPush(status) && PUSH_STATE_WORDS[status.state]) || status.state}`;
    badge.title = stale ? `${name}: ${staleTitle(status)}` : `${name}: ${status.state}. ${STATE_TITLES[status.state] || ""}`;
    badges.push(badge);
  }
  badges.sort((a, b) => (a.dataset.name < b.dataset.name ? -1 : 1));
  if (prefix) {
    const shared = document.createElement("span");
    shared.className = "prefix";
    shared.textContent = prefix;
    badges.unshift(shared);
  }
  $("provider-badges").replaceChildren(...badges);
  const bad = [...providerStatus.values()].filter((s) => !["ok", "connected", "disabled"].includes(s.state)).length;
  const word = stale ? "stale" : bad ? `${bad} not ok` : "all ok";
  $("providers-toggle").setAttribute("aria-label", `Providers: ${providerStatus.size}, ${word}. Show the details`);
}

// "demo-" for demo-quotes, demo-newswire, demo-markets: said once, so a phone's line fits.
function sharedPrefix(names) {
  if (names.length < 2) return "";
  let prefix = names.reduce((a, b) => {
    let i = 0;
    while (i < a.length && a[i] === b[i]) i += 1;
    return a.slice(0, i);
  });
  prefix = prefix.slice(0, Math.max(...["-", "_", ".", ":"].map((sep) => prefix.lastIndexOf(sep))) + 1);
  return names.every((name) => name.length > prefix.length) ? prefix : "";
}

function markProvidersStale() {
  const stale = isStale();
  document.querySelector(".providers").classList.toggle("stale", stale);
  const asof = $("providers-asof");
  asof.hidden = !stale;
  if (stale && !asof.textContent) asof.textContent = `stale · as of ${providersAt.toLocaleTimeString([], { hour12: false })}`;
  if (!stale) asof.textContent = "";
  for (const [name, item] of providers) renderProvider(item, providerStatus.get(name));
  renderSummary();
}

function renderProvider(item, status) {
  const push = isPush(status);
  item.dataset.lastOk = status.last_ok || "";
  item.dataset.state = status.state;
  item.dataset.mode = push ? "push" : "poll";
  const stale = isStale();
  item.classList.toggle("stale", stale);
  const state = item.querySelector(".state");
  state.textContent = stale ? "stale" : (push && PUSH_STATE_WORDS[status.state]) || status.state;
  state.className = `state state-${stale ? "stale" : status.state}`;
  state.title = stale ? staleTitle(status) : STATE_TITLES[status.state] || "";
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

// -- demo ---------------------------------------------------------------------------------

// The built-in demo market's providers are named demo-…, and so are its headlines' `provider`.
const isDemo = (name) => typeof name === "string" && name.startsWith("demo-");

function updateDemo() {
  const demo =
    [...providerStatus.values()].some((status) => isDemo(status.name) && status.state !== "disabled") ||
    headlines.some((entry) => isDemo(entry.event.data?.provider));
  $("demo").hidden = !demo;
  $("demo-note").hidden = !demo;
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
    for (const event of latest) showQuote(event);
  } catch (error) {
    console.warn("stream: could not refresh the page state", error);
  }
}

// -- wiring ---------------------------------------------------------------------------------

function route(event) {
  if (event.topic === "_system.providers") showProvider(event.data);
  else if (event.topic.startsWith("quotes.")) showQuote(event);
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
  // The providers panel likewise; and back live, ask for their current state at once.
  // (While first connecting, what came over HTTP is current: not stale.)
  const wasDown = down;
  down = state === "reconnecting" || state === "offline" || state === "refused";
  markProvidersStale();
  if (state === "live" && wasDown && providersAt !== null) refreshProviders();
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

const socket = new LiveStream({
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
$("providers-toggle").addEventListener("click", () => {
  const open = $("providers-toggle").getAttribute("aria-expanded") !== "true";
  $("providers-toggle").setAttribute("aria-expanded", String(open));
  document.querySelector(".providers").classList.toggle("expanded", open);
  $("providers-toggle").querySelector(".toggle-word").textContent = open ? "hide" : "details";
});

setInterval(() => {
  for (const entry of headlines) {
    const time = entry.item.querySelector("time");
    time.textContent = relativeTime(time.dateTime);
  }
  for (const [name, item] of providers) renderProvider(item, providerStatus.get(name));
}, 10000);

// "just now", "7 s ago": each quote row's last change, kept current between ticks.
setInterval(() => {
  for (const quote of quotes.values()) showChanged(quote);
}, 1000);

setInterval(refreshProviders, 15000);

// Subscribe first, then load what came before: whatever is published in between arrives live
// and the two overlap harmlessly (headlines are de-duplicated by provider and id).
socket.start();
refetch();
window.addEventListener("pagehide", () => socket.stop());
window.addEventListener("pageshow", (event) => {
  if (event.persisted) socket.start(); // back from the back/forward cache: resume from lastId
});
