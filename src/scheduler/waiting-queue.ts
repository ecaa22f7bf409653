import type { Priority } from "./types.js";

const BASE_RANK: Record<Priority, number> = { high: 0, normal: 1, low: 2 };

export interface Waiting {
  priority: Priority;
  enqueuedAt: number;
}

/**
 * The bounded waiting list of one model. Higher priority goes first; every second of
 * waiting ages an entry by `1 / agingSeconds` of a class, so low priority is delayed,
 * never starved.
 */
export class WaitingQueue<T extends Waiting> {
  private readonly items: T[] = [];

  constructor(private readonly agingSeconds = 10) {}

  get length(): number {
    return this.items.length;
  }

  push(item: T): void {
    this.items.push(item);
  }

  remove(item: T): boolean {
    const i = this.items.indexOf(item);
    if (i === -1) return false;
    this.items.splice(i, 1);
    return true;
  }

  /** The next entry to admit: the lowest aged rank, first come first served among equals. */
  shift(now: number): T | undefined {
    let best = -1;
    let bestRank = Infinity;
    for (let i = 0; i < this.items.length; i++) {
      const it = this.items[i]!;
      const rank = BASE_RANK[it.priority] - (now - it.enqueuedAt) / 1000 / this.agingSeconds;
      if (rank < bestRank) {
        bestRank = rank;
        best = i;
      }
    }
    if (best === -1) return undefined;
    return this.items.splice(best, 1)[0];
  }

  /** How many entries would be admitted before a new one of this priority. */
  aheadOf(priority: Priority): number {
    let n = 0;
    for (const it of this.items) if (BASE_RANK[it.priority] <= BASE_RANK[priority]) n++;
    return n;
  }

  drain(): T[] {
    return this.items.splice(0, this.items.length);
  }
}
