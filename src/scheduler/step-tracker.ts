import type { StepObserver } from "../engine/types.js";
import type { SchedulerObserver } from "../observers.js";

export interface StepStats {
  steps: number;
  /** Sequences that took part in steps, summed. */
  items: number;
  /** Sequences that were running at those steps, summed: items / expected is step fullness. */
  expected: number;
  tokens: number;
}

/**
 * The meeting point of a model's scheduler and its engine batch strategy, made before
 * either: the scheduler counts the token loops that are running, the batch strategy
 * reads that count to keep every step full, and reports each step back here.
 */
export class StepTracker implements StepObserver {
  /** Token loops between their first step and their end, not paused: per slot class (one context each). */
  private readonly runningIn: number[] = [0];
  readonly stats: StepStats = { steps: 0, items: 0, expected: 0, tokens: 0 };

  constructor(readonly observer: SchedulerObserver | undefined) {}

  /** All running token loops. */
  get running(): number {
    let n = 0;
    for (const r of this.runningIn) n += r;
    return n;
  }

  /** A token loop of this class starts (+1), pauses or ends (-1). */
  add(slotClass: number, delta: number): void {
    this.runningIn[slotClass] = (this.runningIn[slotClass] ?? 0) + delta;
  }

  expectedItems(slotClass: number): number {
    return this.runningIn[slotClass] ?? 0;
  }

  onStep(slotClass: number, items: number, tokens: number): void {
    const s = this.stats;
    s.steps++;
    s.items += items;
    s.expected += Math.max(items, this.runningIn[slotClass] ?? 0);
    s.tokens += tokens;
    this.observer?.decodeStep(items, tokens);
  }
}
