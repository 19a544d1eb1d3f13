// Numbers and tokens formatted as the CLI formats them (hexray_core/cli/render.py).

/** Python's f"{v:+.2f}": logits and contributions. */
export function signed(v: number, digits = 2): string {
  const s = v.toFixed(digits);
  return s.startsWith("-") ? s : "+" + s;
}

/** Python's f"{p:.1%}". */
export function pct(p: number | null | undefined, digits = 1): string {
  return p == null ? "—" : (p * 100).toFixed(digits) + "%";
}

/** Python's f"{v:.1e}" (completeness error). */
export function sci(v: number): string {
  const [m, e] = v.toExponential(1).split("e");
  const n = Number(e);
  return `${m}e${n < 0 ? "-" : "+"}${String(Math.abs(n)).padStart(2, "0")}`;
}

/** A token as the CLI quotes it: JSON string syntax, so spaces and newlines stay visible. */
export function q(token: string): string {
  return JSON.stringify(token).replace(/\\\\x/g, "\\x");
}

/** A token's text for the strip: tabs made visible, newlines kept as line breaks. Spaces stay spaces (the strip
 * is `white-space: pre-wrap`, which keeps them): a no-break space would leave a one-line prompt no place to wrap. */
export function visible(token: string): string {
  return token.replace(/\t/g, "→");
}
