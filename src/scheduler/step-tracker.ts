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
  /** Token loops between their first step and their end, not paused. */
  running = 0;
  readonly stats: StepStats = { steps: 0, items: 0, expected: 0, tokens: 0 };

  constructor(readonly observer: SchedulerObserver | undefined) {}

  expectedItems(): number {
    return this.running;
  }

  onStep(items: number, tokens: number): void {
    const s = this.stats;
    s.steps++;
    s.items += items;
    s.expected += Math.max(items, this.running);
    s.tokens += tokens;
    this.observer?.decodeStep(items, tokens);
  }
}
