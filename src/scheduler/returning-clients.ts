/**
 * Clients that come back: whether the end of a stream is soon followed by a new request,
 * and how soon.
 *
 * Closed-loop clients (an agent's tool loop, a chat frontend's retry, every benchmark
 * client) send their next request a few milliseconds after a stream ends. A scheduler
 * that forms its next step the moment a stream ends makes that request wait a whole step,
 * and then the step it joins: on the llama-1b shape, streams that had ended together came
 * back 2-12 ms apart and each late one waited ~50 ms more than the first (README, W3). The
 * scheduler uses what this learns to hold the next step briefly for them
 * (Scheduler.holdForReturns).
 *
 * Each end waits for one arrival within a window (a decode step: a later return could not
 * have shared that step anyway); an arrival is matched to the oldest end still waiting.
 * `returnShare` is the fraction of ends that were matched, `latencyMs` how long the matched
 * ones took, both as moving averages, and `latencySpreadMs` how far from that average they
 * fall (TCP's smoothed round-trip time and its variation, RFC 6298): a wait long enough for
 * most returns is `latencyMs + 4 × latencySpreadMs`.
 */
export class ReturningClients {
  /** Ends not yet matched by an arrival, oldest first (ms, performance.now()). */
  private readonly ends: number[] = [];
  /** Moving averages: the fraction of ends followed by an arrival, and that arrival's delay. */
  private share = 0;
  private latency = Infinity;
  private spread = 0;

  static readonly ALPHA = 0.2;
  static readonly BETA = 0.25;
  /** Ends kept waiting at most (a burst of cancellations should not grow the list). */
  static readonly MAX_PENDING = 256;

  get returnShare(): number {
    return this.share;
  }

  get latencyMs(): number {
    return this.latency;
  }

  get latencySpreadMs(): number {
    return this.spread;
  }

  /** A stream ended at `now`. */
  ended(now: number, windowMs: number): void {
    this.expire(now, windowMs);
    if (this.ends.length >= ReturningClients.MAX_PENDING) {
      this.ends.shift();
      this.miss();
    }
    this.ends.push(now);
  }

  /** A request arrived at `now`: it returns for the oldest end still waiting, if any. */
  arrived(now: number, windowMs: number): void {
    this.expire(now, windowMs);
    const end = this.ends.shift();
    if (end === undefined) return;
    const ms = now - end;
    this.share += ReturningClients.ALPHA * (1 - this.share);
    if (this.latency === Infinity) {
      this.latency = ms;
      this.spread = ms / 2;
    } else {
      this.spread += ReturningClients.BETA * (Math.abs(ms - this.latency) - this.spread);
      this.latency += ReturningClients.ALPHA * (ms - this.latency);
    }
  }

  /** Ends still waiting for their client to come back. */
  pending(now: number, windowMs: number): number {
    this.expire(now, windowMs);
    return this.ends.length;
  }

  private expire(now: number, windowMs: number): void {
    while (this.ends.length > 0 && now - this.ends[0]! > windowMs) {
      this.ends.shift();
      this.miss();
    }
  }

  /** An end whose client did not come back in time. */
  private miss(): void {
    this.share -= ReturningClients.ALPHA * this.share;
  }
}
