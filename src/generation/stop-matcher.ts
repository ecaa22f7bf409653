/**
 * Holds back text that could be the start of a stop string, so that no part of a stop
 * string ever reaches the client, even when it spans several tokens.
 */
export class StopMatcher {
  private held = "";
  private readonly maxLen: number;
  /** First characters of the stop strings: a tail without any of them holds nothing back. */
  private readonly starts: Set<string>;

  constructor(private readonly stops: readonly string[]) {
    this.maxLen = stops.reduce((m, s) => Math.max(m, s.length), 0);
    this.starts = new Set(stops.map((s) => s[0]!));
  }

  /**
   * Feeds text; returns what may be sent now. `stopped` is true once a stop string is
   * complete: the returned text is everything before it, and nothing more may follow.
   */
  push(text: string): { text: string; stopped: boolean; matched?: string } {
    if (this.maxLen === 0) return { text, stopped: false };
    const buf = this.held + text;
    // The stop string that completes first in the stream wins (earliest end, then the
    // longer one), so the result does not depend on how the text was split into tokens.
    let cut = -1;
    let cutEnd = Infinity;
    let matched: string | undefined;
    for (const stop of this.stops) {
      const at = buf.indexOf(stop);
      if (at === -1) continue;
      const end = at + stop.length;
      if (end < cutEnd || (end === cutEnd && at < cut)) {
        cut = at;
        cutEnd = end;
        matched = stop;
      }
    }
    if (cut !== -1) {
      this.held = "";
      return { text: buf.slice(0, cut), stopped: true, matched };
    }
    const keep = this.partialSuffixLength(buf);
    this.held = keep > 0 ? buf.slice(buf.length - keep) : "";
    return { text: keep > 0 ? buf.slice(0, buf.length - keep) : buf, stopped: false };
  }

  /** At the end of generation the held text was not a stop string after all. */
  flush(): string {
    const rest = this.held;
    this.held = "";
    return rest;
  }

  /** Length of the longest suffix of `buf` that is a proper prefix of some stop string. */
  private partialSuffixLength(buf: string): number {
    const limit = Math.min(buf.length, this.maxLen - 1);
    // The per-token fast path: no stop string can start in the tail.
    let candidate = false;
    for (let i = buf.length - limit; i < buf.length && !candidate; i++) candidate = this.starts.has(buf[i]!);
    if (!candidate) return 0;
    for (let len = limit; len > 0; len--) {
      const tail = buf.slice(buf.length - len);
      for (const stop of this.stops) if (stop.length > len && stop.startsWith(tail)) return len;
    }
    return 0;
  }
}
