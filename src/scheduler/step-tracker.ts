import { stepsOnJsThread } from "../engine/step-thread.js";
import type { StepObserver } from "../engine/types.js";
import type { SchedulerObserver } from "../observers.js";
import { ReturningClients } from "./returning-clients.js";

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
  /** Loops before their first token or paused before a step, by class (unsettledLoops). */
  private readonly unsettledIn: number[] = [0];
  /** Loops paused before a step (a hold, a KV trim), by class: not running, but the class is not idle. */
  private readonly pausedIn: number[] = [0];
  readonly stats: StepStats = { steps: 0, items: 0, expected: 0, tokens: 0 };
  /** A recent decode step's time per class, ms: an exponential average of the token loops' inter-token times. */
  private readonly stepMs: number[] = [];
  /** Per class: the wait that arrivals at an idle class are gathering behind, while it lasts. */
  private readonly gates: Array<Promise<void> | undefined> = [];
  /** Per class: decode steps so far, and how many there were when a token loop last started it from idle without waiting. */
  private readonly stepsIn: number[] = [];
  private readonly idleStartStep: number[] = [];
  /** Per class: whether its arrivals come in bursts. */
  private readonly bursty: boolean[] = [];
  /** Per class: someone joined the open gate. */
  private readonly joined: boolean[] = [];
  /** Per class: what token loops wait on before writing a token (nextStepFormed), settled by the class's next step. */
  private readonly nextStep: Array<{ formed: Promise<void>; settle: () => void } | undefined> = [];
  /** Per class: the step that carries some token loops' last tokens (their max_tokens), and how many of them. */
  private readonly finalStep: Array<{ step: number; loops: number } | undefined> = [];
  /** Whether streams that end are followed by their clients' next requests, and how soon. */
  readonly returns = new ReturningClients();

  /**
   * `delayFactor`: arrivals at an idle class wait this fraction of a recent step's time
   * (at most MAX_ARRIVAL_WAIT_MS) for others arriving with them (arrivalGate); 0: never.
   */
  constructor(
    readonly observer: SchedulerObserver | undefined,
    private readonly delayFactor = 0,
    /** The engine runs the steps step-thread.ts allows on the JavaScript thread (--step-thread auto on a local build). */
    private readonly loneStepsOnJsThread = false,
  ) {}

  static readonly MAX_ARRIVAL_WAIT_MS = 5;
  /** Shorter waits are not worth a timer: steps that short cost little to wait a whole one. */
  static readonly MIN_ARRIVAL_WAIT_MS = 0.25;

  /** A token loop saw `ms` between two of its tokens: about one decode step of its class. */
  noteStepTime(slotClass: number, ms: number): void {
    const prev = this.stepMs[slotClass];
    this.stepMs[slotClass] = prev === undefined ? ms : prev + 0.1 * (ms - prev);
  }

  /**
   * A token loop about to start in a class where none runs waits a moment for requests
   * arriving with it, so that they share their first step instead of each waiting a
   * whole step behind the first (vLLM's scheduler delay factor, applied at an idle
   * start: while loops run, each step boundary gathers new arrivals anyway). Everyone
   * arriving during the wait shares it and starts in the same turn.
   *
   * Only where arrivals come in bursts: a request alone never waits for company that does
   * not come (a lone request's first token would be late by the whole wait). A class
   * learns it from an arrival during the first step of a loop that started it from idle
   * without waiting (one that came too late to share that step), and keeps waiting while
   * its waits gather someone. Undefined: start now.
   */
  arrivalGate(slotClass: number): Promise<void> | undefined {
    const wait = Math.min(StepTracker.MAX_ARRIVAL_WAIT_MS, this.delayFactor * (this.stepMs[slotClass] ?? 0));
    if (wait < StepTracker.MIN_ARRIVAL_WAIT_MS) return undefined;
    const steps = this.stepsIn[slotClass] ?? 0;
    // Paused loops count: an arrival during another's KV trim is not an idle start, and
    // waiting there made it miss the step the trim's request started in.
    if ((this.runningIn[slotClass] ?? 0) + (this.pausedIn[slotClass] ?? 0) > 0) {
      if (steps - (this.idleStartStep[slotClass] ?? -Infinity) <= 1) this.bursty[slotClass] = true;
      return undefined;
    }
    const open = this.gates[slotClass];
    if (open !== undefined) {
      this.joined[slotClass] = true;
      return open;
    }
    if (this.bursty[slotClass] !== true) {
      this.idleStartStep[slotClass] = steps;
      return undefined;
    }
    this.joined[slotClass] = false;
    const gate = new Promise<void>((resolve) => setTimeout(resolve, wait)).then(() => {
      this.gates[slotClass] = undefined;
      this.bursty[slotClass] = this.joined[slotClass] === true;
    });
    this.gates[slotClass] = gate;
    return gate;
  }

  /**
   * A token loop has just asked for the step that carries its last token (its max_tokens):
   * the next step formed in its class. Returns that step's number, for loopEnded.
   */
  askedFinalStep(slotClass: number): number {
    const step = (this.stepsIn[slotClass] ?? 0) + 1;
    const f = this.finalStep[slotClass];
    if (f !== undefined && f.step === step) f.loops++;
    else this.finalStep[slotClass] = { step, loops: 1 };
    return step;
  }

  /** Token loops whose last token came from the step this class formed last (the one whose tokens are being handed out). */
  endingNow(slotClass: number): number {
    const f = this.finalStep[slotClass];
    return f !== undefined && f.step === (this.stepsIn[slotClass] ?? 0) ? f.loops : 0;
  }

  /**
   * A token loop of this class ended at `now` (its stream is over); `finalStep`: the step
   * askedFinalStep gave it, if it asked for one. Its client may come back (returns).
   */
  loopEnded(slotClass: number, finalStep: number | undefined, now: number): void {
    const f = this.finalStep[slotClass];
    if (finalStep !== undefined && f !== undefined && f.step === finalStep) f.loops--;
    this.returns.ended(now, this.returnWindowMs());
  }

  /**
   * Whether a step of this class may be decoded before its token loops ask for it (steps
   * run ahead, run-ahead.ts): not while a loop is starting or paused (its prefill would
   * join that step, so the one run ahead would not be taken), nor while an ended stream's
   * client is expected back (the same, a moment later). A step run ahead that nobody
   * takes is stopped part-way, and the step after waits for the part it ran.
   */
  quietFor(slotClass: number, now: number): boolean {
    return (this.unsettledIn[slotClass] ?? 0) === 0 && this.expectedReturns(slotClass, now) === 0;
  }

  /** A request arrived at `now`. */
  arrived(now: number): void {
    this.returns.arrived(now, this.returnWindowMs());
  }

  /** Streams of this class that ended, or end with the step just done, whose clients have not come back yet. */
  expectedReturns(slotClass: number, now: number): number {
    return this.returns.pending(now, this.returnWindowMs()) + this.endingNow(slotClass);
  }

  /**
   * How long the next step of this class should wait for clients coming back (ms), 0 for
   * not at all: only where ended streams' clients have mostly come back (half of them or
   * more), soon (their usual delay within a quarter of a step: each one gathered saves
   * about a step, each running loop loses the wait), and some are expected now. Long
   * enough for most of them (their usual delay and four times its spread, and a
   * millisecond), at most half a step. 0 with the delay factor at 0.
   */
  returnHoldMs(slotClass: number, now: number): number {
    const step = this.stepMs[slotClass];
    const r = this.returns;
    if (this.delayFactor <= 0 || step === undefined || r.returnShare < 0.5 || !(r.latencyMs <= 0.25 * step)) return 0;
    if (this.expectedReturns(slotClass, now) === 0) return 0;
    return Math.min(0.5 * step, r.latencyMs + 4 * r.latencySpreadMs + 1);
  }

  /** A return counts within a step of the longest class: a later one could not have shared the step it ended. */
  private returnWindowMs(): number {
    let w = 0;
    for (const ms of this.stepMs) if (ms !== undefined && ms > w) w = ms;
    return w;
  }

  /**
   * Whether a token loop that has asked for its next token should make this token's text
   * and frame only once that next step is formed (nextStepFormed): yes where the step goes
   * to a job, so that work runs beside it; no where it would run on this thread (a lone
   * sequence's, see step-thread.ts), where waiting would only make the token late by a step.
   */
  writesWaitForNextStep(slotClass: number): boolean {
    // A decode step carries a token for every running loop (the batch strategy sees to it).
    return !this.loneStepsOnJsThread || !stepsOnJsThread(this.runningIn[slotClass] ?? 0, 1);
  }

  /**
   * Settles when this class's next decode step has been formed, in the microtask turn after
   * it is handed to the engine. Without the wait, every running loop's text and frames
   * came between a step's last sample and the next step (the batch strategy waits for every
   * running loop to ask, and they all resume in one turn): 0.5-0.9 ms of a 14 ms step at 16
   * sequences on the W2 model. One promise per class and step, shared by every loop
   * waiting on it.
   */
  nextStepFormed(slotClass: number): Promise<void> {
    let next = this.nextStep[slotClass];
    if (next === undefined) {
      let settle!: () => void;
      const formed = new Promise<void>((resolve) => (settle = resolve));
      next = this.nextStep[slotClass] = { formed, settle };
    }
    return next.formed;
  }

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

  /** A running loop of this class pauses before its next step (+1), or resumes (-1): unsettled, and not running, meanwhile. */
  paused(slotClass: number, delta: 1 | -1): void {
    this.pausedIn[slotClass] = (this.pausedIn[slotClass] ?? 0) + delta;
    this.add(slotClass, -delta);
    this.unsettle(slotClass, delta);
  }

  /** A loop of this class becomes unsettled (+1: it starts) or settles (-1: its first token came); pauses go through paused(). */
  unsettle(slotClass: number, delta: 1 | -1): void {
    this.unsettledIn[slotClass] = (this.unsettledIn[slotClass] ?? 0) + delta;
  }

  unsettledLoops(slotClass: number): number {
    return this.unsettledIn[slotClass] ?? 0;
  }

  onStep(slotClass: number, items: number, tokens: number): void {
    this.stepsIn[slotClass] = (this.stepsIn[slotClass] ?? 0) + 1;
    const s = this.stats;
    s.steps++;
    s.items += items;
    s.expected += Math.max(items, this.runningIn[slotClass] ?? 0);
    s.tokens += tokens;
    this.observer?.decodeStep(items, tokens);
    const next = this.nextStep[slotClass];
    if (next !== undefined) {
      this.nextStep[slotClass] = undefined;
      next.settle();
    }
  }
}
