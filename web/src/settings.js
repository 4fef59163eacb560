// Pure helpers: read sampling settings from the controls' raw strings, and
// format stream statistics. No DOM here.

export const DEFAULTS = Object.freeze({
  temperature: "0.8",
  topP: "0.95",
  maxTokens: "200",
  // One stop sequence per line; backslash escapes (\n, \t, \\) are decoded.
  // "\n\n" ends a reply at the end of a speech, which suits the bundled model.
  stop: "\\n\\n",
  compareTemps: "0, 0.7, 1.2",
  token: "",
});

/** Decode \n, \t, \r and \\ in one line typed by a person. */
export function unescape(line) {
  return line.replace(/\\(.)/g, (_, c) => ({ n: "\n", t: "\t", r: "\r", "\\": "\\" })[c] ?? `\\${c}`);
}

/** Stop sequences from the textarea: one per line, escapes decoded, empty lines ignored. */
export function parseStops(text) {
  return text
    .split("\n")
    .filter((line) => line.length > 0)
    .map(unescape);
}

function number(raw, name, { min, max, minExclusive = false, integer = false }) {
  const s = String(raw).trim();
  const v = Number(s);
  if (s === "" || !Number.isFinite(v)) throw new Error(`${name} must be a number`);
  if (integer && !Number.isInteger(v)) throw new Error(`${name} must be a whole number`);
  if (minExclusive ? v <= min : v < min) throw new Error(`${name} must be ${minExclusive ? ">" : ">="} ${min}`);
  if (max !== undefined && v > max) throw new Error(`${name} must be <= ${max}`);
  return v;
}

/**
 * Validate the raw control values (compareTemps is read only when raw.compare is true).
 * Returns {temperature, top_p, max_tokens, stop, compareTemps} or throws Error with a message
 * fit for the page. max_tokens is deliberately not capped at the server's limit: the server
 * answers with an error frame, which the page shows.
 */
export function readSettings(raw) {
  let compareTemps = [];
  if (raw.compare) {
    compareTemps = String(raw.compareTemps)
      .split(",")
      .map((s) => s.trim())
      .filter((s) => s !== "")
      .map((s) => number(s, "each compare temperature", { min: 0, max: 100 }));
    if (compareTemps.length < 1 || compareTemps.length > 8) {
      throw new Error("compare needs 1 to 8 temperatures, separated by commas");
    }
  }
  return {
    temperature: number(raw.temperature, "temperature", { min: 0, max: 100 }),
    top_p: number(raw.topP, "top_p", { min: 0, max: 1, minExclusive: true }),
    max_tokens: number(raw.maxTokens, "max tokens", { min: 1, integer: true }),
    stop: parseStops(raw.stop),
    compareTemps,
  };
}

/** "123 ms" / "1.23 s" */
export function formatMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** Shorter windows than this give meaningless rates (a few coalesced frames a microsecond apart). */
export const MIN_RATE_WINDOW_MS = 20;

/**
 * Decode rate in tokens/s: tokens after the first frame over the time since it arrived,
 * so time-to-first-token does not drag the rate down. null until that window is long enough.
 */
export function tokensPerSecond({ tokens, firstTokens, firstAt, lastAt }) {
  if (firstAt === null || lastAt === null || tokens <= firstTokens) return null;
  if (lastAt - firstAt < MIN_RATE_WINDOW_MS) return null;
  return ((tokens - firstTokens) * 1000) / (lastAt - firstAt);
}
