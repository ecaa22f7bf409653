import type { Priority } from "./types.js";

const BASE_RANK: Record<Priority, number> = { high: 0, normal: 1, low: 2 };

export interface Waiting {
  priority: Priority;
  enqueuedAt: number;
  /** Who it is for (an API key's tenant); entries without one share one tenant. */
  tenant?: string;
  /** The tenant's share when several wait; default 1. */
  weight?: number;
}

/**
 * The bounded waiting list of one model.
 *
 * Priority first: higher classes go first, and every `agingSeconds` of waiting lifts an
 * entry one class, so low priority is delayed, never starved. Within the class that goes
 * next, tenants share by weight (stride scheduling, a smooth deficit round robin): each
 * admission advances its tenant's pass by 1/weight and the tenant with the lowest pass
 * goes next, so a client with 60 requests waiting does not make another client's one
 * request wait for all 60. Within a tenant, first come first served. A tenant that was
 * idle starts at the current pass: waiting banks no credit.
 */
export class WaitingQueue<T extends Waiting> {
  private readonly items: T[] = [];
  private readonly passes = new Map<string, number>();
  /** The pass of the last admission: where a returning tenant starts. */
  private virtualTime = 0;

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

  private rank(it: T, now: number): number {
    return BASE_RANK[it.priority] - Math.floor((now - it.enqueuedAt) / 1000 / this.agingSeconds);
  }

  private pass(it: T): number {
    return Math.max(this.passes.get(it.tenant ?? "") ?? 0, this.virtualTime);
  }

  /**
   * The next entry to admit, among those `admissible` accepts (those that can start now:
   * one that needs a busy slot class does not hold up those that fit a free one).
   */
  shift(now: number, admissible?: (item: T) => boolean): T | undefined {
    let best = -1;
    let bestRank = Infinity;
    let bestPass = Infinity;
    for (let i = 0; i < this.items.length; i++) {
      const it = this.items[i]!;
      if (admissible && !admissible(it)) continue;
      const rank = this.rank(it, now);
      if (rank > bestRank) continue;
      const pass = this.pass(it);
      // Items are in arrival order, so "strictly better" keeps first come first served on ties.
      if (rank < bestRank || pass < bestPass) {
        best = i;
        bestRank = rank;
        bestPass = pass;
      }
    }
    if (best === -1) return undefined;
    const [item] = this.items.splice(best, 1);
    this.virtualTime = bestPass;
    this.passes.set(item!.tenant ?? "", bestPass + 1 / (item!.weight ?? 1));
    return item;
  }

  /** How many entries would be admitted before a new one of this priority (tenants aside). */
  aheadOf(priority: Priority): number {
    let n = 0;
    for (const it of this.items) if (BASE_RANK[it.priority] <= BASE_RANK[priority]) n++;
    return n;
  }

  drain(): T[] {
    return this.items.splice(0, this.items.length);
  }
}
