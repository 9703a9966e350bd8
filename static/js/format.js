// Small formatting helpers for the dashboard.

const SVG = "http://www.w3.org/2000/svg";

export function priceText(price) {
  const digits = price >= 1000 ? 0 : 2;
  return price.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

export function changeText(data) {
  const pct = Number(data.change_pct);
  if (Number.isFinite(pct)) return `${pct > 0 ? "+" : ""}${pct.toFixed(2)}%`;
  const change = Number(data.change);
  return Number.isFinite(change) ? `${change > 0 ? "+" : ""}${change.toFixed(2)}` : "";
}

export function relativeTime(iso) {
  const then = Date.parse(iso);
  if (!Number.isFinite(then)) return "";
  const seconds = Math.max(0, Math.round((Date.now() - then) / 1000));
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return new Date(then).toLocaleDateString();
}

// A duration in seconds in human units: ms under 1 s, s under 2 min, then min, h and days.
export function durationText(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, seconds);
  if (s < 0.0005) return "<1 ms";
  if (s < 0.9995) return `${Math.round(s * 1000)} ms`;
  if (s < 9.95) return `${s.toFixed(1)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} days`;
}

// A wall-clock time: "14:02" today, with the date on another day.
export function clockTime(iso) {
  const then = new Date(iso);
  if (!Number.isFinite(then.getTime())) return "";
  const time = then.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  return then.toDateString() === new Date().toDateString() ? time : `${then.toLocaleDateString()} ${time}`;
}

// "14:02:07": a wall-clock time to the second, 24-hour.
export function wallTime(iso) {
  const then = new Date(iso);
  return Number.isFinite(then.getTime()) ? then.toLocaleTimeString([], { hour12: false }) : "";
}

// A line's direction from its first point to its last: "up", "down" or "flat".
export function direction(values) {
  if (values.length < 2) return "flat";
  const delta = values[values.length - 1] - values[0];
  return delta > 0 ? "up" : delta < 0 ? "down" : "flat";
}

// A sparkline coloured by its own direction (CSS: svg.spark.up / .down / .flat), so a line
// that goes up is never red, whatever the day's change says.
export function sparkline(values) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", `spark ${direction(values)}`);
  svg.setAttribute("viewBox", "0 0 84 22");
  svg.setAttribute("aria-hidden", "true");
  if (values.length < 2) return svg;
  const low = Math.min(...values);
  const high = Math.max(...values);
  const span = high - low || 1;
  const step = 84 / (values.length - 1);
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(20 - ((v - low) / span) * 18).toFixed(1)}`);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  return svg;
}
