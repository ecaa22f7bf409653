import { ApiError } from "../errors.js";
import type { GenerateOptions, SamplingParams, StepProbe, Token } from "../engine/types.js";
import { StopMatcher } from "../generation/stop-matcher.js";
import { Utf8Detokenizer } from "../generation/utf8-detokenizer.js";
import type { SchedulerSnapshot } from "../observers.js";
import { StepTracker } from "./step-tracker.js";
import type { FinishReason, GenerationOutcome, GenerationRequest, TokenLogprob, TokenSink, Usage } from "./types.js";
import { WaitingQueue } from "./waiting-queue.js";

/** What the scheduler needs of a slot; the engine's sequence, or a fake in unit tests. */
export interface SlotSequence {
  readonly index: number;
  /** Its slot class (one context per class) and that class's tokens per sequence. */
  readonly slotClass: number;
  readonly ctxSize: number;
  heldTokens(): readonly Token[];
  truncate(from: number): Promise<void>;
  prefill(tokens: Token[], priority: number): Promise<void>;
  generate(tokens: Token[], sampling: SamplingParams, generated: Token[], extras?: GenerateOptions): AsyncGenerator<Token, void, void>;
  /** The next-token distribution after each of the tokens (prompt scoring). */
  score(tokens: Token[]): Promise<Array<ReadonlyMap<Token, number> | undefined>>;
}

export interface SchedulerModel {
  readonly id: string;
  readonly sequences: readonly SlotSequence[];
  detokenize(tokens: readonly Token[], lastTokens?: readonly Token[]): string;
  makeTokenBias(bias: ReadonlyMap<number, number>): unknown;
  /** A token's text and bytes, for logprobs. */
  tokenText(token: Token, before?: readonly Token[]): { text: string; bytes: number[] };
  readonly eogTokens: readonly Token[];
}

export interface SchedulerOptions {
  maxQueue: number;
  /** Bound on the prompt tokens of all waiting requests together. */
  maxQueuedTokens?: number;
  /** Prompt tokens evaluated per prefill chunk; cancel and deadline are checked between chunks. */
  prefillChunk?: number;
}

interface Slot {
  seq: SlotSequence;
  busy: boolean;
  lastUsed: number;
  /** A decode failed on it: its KV is not trusted and is cleared before reuse. */
  dirty: boolean;
}

interface Job {
  req: GenerationRequest;
  sink: TokenSink;
  /** Resolves submit()'s promise; called once, after the sink's last event. */
  settle: (outcome: GenerationOutcome) => void;
  ended: boolean;
  priority: GenerationRequest["priority"];
  enqueuedAt: number;
  tenant: string | undefined;
  weight: number | undefined;
  timer: NodeJS.Timeout | undefined;
  onAbort: (() => void) | undefined;
  started: boolean;
  /** The hold for returning clients it arrived during (holdForReturns), until its slot is trimmed. */
  returning: Hold | null;
}

/** A pause held for returning clients (Scheduler.holdForReturns); `arriving`: requests that came during it and have not yet trimmed their slot. */
interface Hold {
  slotClass: number;
  release: () => void;
  timer: NodeJS.Timeout;
  arriving: number;
}

const EVALUATION_PRIORITY = { high: 5, normal: 3, low: 1 } as const;

/** Prompt tokens a larger class's slot must share beyond a smaller one's to be taken instead. */
const PREFIX_ADVANTAGE = 32;

/** Whether a request's prompt and its tokens to come fit the slot's context. */
function fits(slot: { seq: { ctxSize: number } }, req: Pick<GenerationRequest, "promptTokens" | "maxTokens" | "fillsContext">): boolean {
  return req.promptTokens.length + (req.fillsContext ? 1 : Math.max(req.maxTokens, 1)) <= slot.seq.ctxSize;
}

/** Why a generation was aborted: the transport's own reason when it gave one. */
function abortReason(signal: AbortSignal): ApiError {
  return signal.reason instanceof ApiError ? signal.reason : new ApiError("cancelled", "The client closed the request.", { code: "client_disconnected" });
}

/**
 * One scheduler per resident model. Slots are the context's sequences, created once;
 * requests wait in a bounded queue for a free slot; each running request drives its
 * own token loop and the engine batches the loops' tokens into shared decode steps.
 */
export class Scheduler {
  private readonly slots: Slot[] = [];
  private readonly queue = new WaitingQueue<Job>();
  private readonly maxQueue: number;
  private readonly maxQueuedTokens: number;
  private queuedTokens = 0;
  private readonly prefillChunk: number;
  private pauseDepth = 0;
  private resumeGate: Promise<void> | null = null;
  private releaseGate: (() => void) | null = null;
  /** The pause held for returning clients, while it lasts (holdForReturns). */
  private hold: Hold | null = null;
  private readonly completions: number[] = [];
  private closed = false;
  /** Set by terminate(): every running generation ends with it at its next step. */
  private terminating: ApiError | undefined;

  /**
   * `steps` is the tracker the engine's batch strategy was given when the model loaded:
   * the scheduler counts its running token loops there, the strategy reads them.
   */
  constructor(
    private readonly model: SchedulerModel,
    private readonly steps: StepTracker,
    opts: SchedulerOptions,
  ) {
    this.maxQueue = opts.maxQueue;
    this.maxQueuedTokens = opts.maxQueuedTokens ?? Infinity;
    this.prefillChunk = opts.prefillChunk ?? 256;
    for (const seq of model.sequences) this.slots.push({ seq, busy: false, lastUsed: 0, dirty: false });
  }

  snapshot(): SchedulerSnapshot {
    const { steps, items, expected, tokens } = this.steps.stats;
    return { busySlots: this.busySlots, totalSlots: this.totalSlots, waiting: this.waiting, waitingTokens: this.queuedTokens, heldTokens: this.heldTokens(), runningTokens: this.heldTokens(true), steps, items, expected, tokens };
  }

  /** Tokens whose KV the slots hold (in use, of what the context reserves); `busyOnly`: only slots serving a request. */
  heldTokens(busyOnly = false): number {
    let n = 0;
    for (const s of this.slots) if (s.busy || !busyOnly) n += s.seq.heldTokens().length;
    return n;
  }

  get busySlots(): number {
    let n = 0;
    for (const s of this.slots) if (s.busy) n++;
    return n;
  }

  get totalSlots(): number {
    return this.slots.length;
  }

  get waiting(): number {
    return this.queue.length;
  }

  get waitingTokens(): number {
    return this.queuedTokens;
  }

  /**
   * Requests finished per second over the last minute, or undefined without enough
   * recent history to say (then nothing is refused on a prediction).
   */
  measuredDrainRate(now = performance.now()): number | undefined {
    const c = this.completions;
    let first = 0;
    while (first < c.length && now - c[first]! > 60_000) first++;
    const n = c.length - first;
    if (n < 2) return undefined;
    // From the oldest recent completion to now: an idle stretch lowers the rate, as it should.
    const span = (now - c[first]!) / 1000;
    return span > 0 ? (n - 1) / span : undefined;
  }

  /** Seconds until `ahead + 1` requests could have drained, at the measured rate (or one per slot per second). */
  private predictedWaitSeconds(ahead: number): number {
    const rate = this.measuredDrainRate() ?? Math.max(1, this.slots.length);
    return (ahead + 1) / rate;
  }

  private retryAfterSeconds(): number {
    return Math.min(60, Math.max(1, Math.ceil(this.predictedWaitSeconds(this.queue.length))));
  }

  /**
   * Admits a request or throws an ApiError at once (queue full, shutting down). The
   * returned promise resolves with the outcome once the sink got its last event.
   */
  submit(req: GenerationRequest, sink: TokenSink): Promise<GenerationOutcome> {
    if (this.closed) {
      throw new ApiError("unavailable", "The server is shutting down.", { retryAfter: 5, code: "shutting_down" });
    }
    if (req.signal.aborted) throw abortReason(req.signal);
    const hasFreeSlot = this.queue.length === 0 && this.slots.some((s) => !s.busy && fits(s, req));
    if (!hasFreeSlot) this.admitToQueue(req);
    return new Promise<GenerationOutcome>((settle) => {
      const job: Job = {
        req,
        sink,
        settle,
        ended: false,
        priority: req.priority,
        enqueuedAt: performance.now(),
        tenant: req.tenant?.name,
        weight: req.tenant?.weight,
        timer: undefined,
        onAbort: undefined,
        started: false,
        returning: this.hold,
      };
      req.timeline.queuedAt = job.enqueuedAt;
      this.steps.arrived(job.enqueuedAt);
      if (this.hold !== null) this.hold.arriving++;
      this.queue.push(job);
      this.queuedTokens += req.promptTokens.length;
      this.pump();
      if (!job.started) this.watchWhileQueued(job);
    });
  }

  /** A queued request leaves the queue when its client goes or its deadline passes. */
  private watchWhileQueued(job: Job): void {
    const leave = (err: ApiError) => {
      if (!this.queue.remove(job)) return;
      this.queuedTokens -= job.req.promptTokens.length;
      this.unwatch(job);
      this.end(job, { error: err, usage: undefined });
    };
    job.onAbort = () => leave(abortReason(job.req.signal));
    job.req.signal.addEventListener("abort", job.onAbort, { once: true });
    const wait = Math.max(0, job.req.deadline - performance.now());
    job.timer = setTimeout(
      () => leave(new ApiError("timeout", "The request's deadline passed while it waited in the queue.", { code: "queue_timeout" })),
      wait,
    );
  }

  private unwatch(job: Job): void {
    if (job.timer !== undefined) clearTimeout(job.timer);
    if (job.onAbort !== undefined) job.req.signal.removeEventListener("abort", job.onAbort);
    job.timer = undefined;
    job.onAbort = undefined;
  }

  /** Refuses, early and with a Retry-After, a request that would wait beyond a bound or its deadline. */
  private admitToQueue(req: GenerationRequest): void {
    if (this.queue.length >= this.maxQueue || this.queuedTokens + req.promptTokens.length > this.maxQueuedTokens) {
      throw new ApiError(
        "overloaded",
        `Model "${this.model.id}" is overloaded: ${this.queue.length} requests (${this.queuedTokens} prompt tokens) are waiting. Retry later.`,
        { code: "queue_full", retryAfter: this.retryAfterSeconds() },
      );
    }
    const rate = this.measuredDrainRate();
    if (rate !== undefined) {
      const wait = (this.queue.aheadOf(req.priority) + 1) / rate;
      const left = (req.deadline - performance.now()) / 1000;
      if (wait > left) {
        throw new ApiError(
          "overloaded",
          `Model "${this.model.id}" cannot start this request before its deadline: the predicted wait is ${wait.toFixed(1)}s and the deadline is in ${left.toFixed(1)}s.`,
          { code: "deadline_unmeetable", retryAfter: Math.min(60, Math.max(1, Math.ceil(wait))) },
        );
      }
    }
  }

  private pump(): void {
    while (this.queue.length > 0) {
      const free = this.slots.filter((s) => !s.busy);
      if (free.length === 0) return;
      // The next request that fits a free slot: one waiting for a busy larger class holds up no one.
      const job = this.queue.shift(performance.now(), (j) => free.some((s) => fits(s, j.req)));
      if (!job) return;
      this.queuedTokens -= job.req.promptTokens.length;
      this.unwatch(job);
      job.started = true;
      const slot = this.pickSlot(free, job.req)!;
      slot.busy = true;
      void this.run(job, slot);
    }
  }

  /**
   * The free slot for a request.
   *
   * Class: the smallest slot class it fits (larger classes stay free for the requests only
   * they can take), unless a larger class's slot shares PREFIX_ADVANTAGE more tokens of the
   * prompt (reusing a conversation's KV beats a smaller slot).
   *
   * Within the class: the slot that keeps the busy slots' indices in the fewest runs of
   * consecutive numbers. llama.cpp decodes a step's sequences in one pass over the
   * weights only when their ids are consecutive (with a KV cache per sequence, as
   * node-llama-cpp's is); each gap costs another pass for every step of every running
   * request. Then the longest shared prefix, then the lowest index.
   */
  private pickSlot(free: Slot[], req: GenerationRequest): Slot | undefined {
    const prompt = req.promptTokens;
    const fitting = free.filter((s) => fits(s, req));
    if (fitting.length === 0) return undefined;
    const shared = new Map<Slot, number>();
    for (const slot of fitting) shared.set(slot, slot.dirty ? 0 : commonPrefix(slot.seq.heldTokens(), prompt));
    const smallest = Math.min(...fitting.map((s) => s.seq.ctxSize));
    const bestIn = (pred: (s: Slot) => boolean) => Math.max(-1, ...fitting.filter(pred).map((s) => shared.get(s)!));
    const smallShared = bestIn((s) => s.seq.ctxSize === smallest);
    let cls = fitting.find((s) => s.seq.ctxSize === smallest)!.seq.slotClass;
    const larger = fitting.filter((s) => s.seq.ctxSize > smallest && shared.get(s)! >= smallShared + PREFIX_ADVANTAGE);
    if (larger.length > 0) cls = larger.reduce((a, b) => (shared.get(b)! > shared.get(a)! ? b : a)).seq.slotClass;
    const busy = new Set(this.slots.filter((s) => s.busy && s.seq.slotClass === cls).map((s) => s.seq.index));
    const runsWith = (index: number) => {
      let runs = 0;
      for (const i of [...busy, index]) if (!busy.has(i - 1) && i - 1 !== index) runs++;
      return runs;
    };
    let best: Slot | undefined;
    let bestKey: [number, number, number] = [Infinity, -Infinity, Infinity];
    for (const slot of fitting) {
      if (slot.seq.slotClass !== cls) continue;
      const key: [number, number, number] = [runsWith(slot.seq.index), shared.get(slot)!, slot.seq.index];
      if (key[0] < bestKey[0] || (key[0] === bestKey[0] && (key[1] > bestKey[1] || (key[1] === bestKey[1] && key[2] < bestKey[2])))) {
        best = slot;
        bestKey = key;
      }
    }
    return best;
  }

  /**
   * Runs `fn` while every token loop is held before its next step. KV edits take the
   * context lock, which the batch loop holds while any sequence is generating; without
   * the pause they would wait until the other requests finished.
   */
  private async whilePaused<T>(fn: () => Promise<T>): Promise<T> {
    const resume = this.pause();
    try {
      return await fn();
    } finally {
      resume();
    }
  }

  /** Holds every token loop before its next step until the returned function is called (once). */
  private pause(): () => void {
    if (this.pauseDepth++ === 0) this.resumeGate = new Promise((r) => (this.releaseGate = r));
    let done = false;
    return () => {
      if (done) return;
      done = true;
      if (--this.pauseDepth === 0) {
        const release = this.releaseGate!;
        this.resumeGate = null;
        this.releaseGate = null;
        release();
      }
    };
  }

  /**
   * Streams of `slotClass` have ended (or end with the step just done) and their clients
   * usually come back within a fraction of a step (StepTracker.returnHoldMs): hold every
   * token loop before its next step until they have all arrived and trimmed their slots,
   * or the hold's time is up, so that they share that step instead of each waiting a whole
   * step behind it. Without it, requests that a benchmark's (or an agent's) clients sent
   * 2-12 ms after their streams ended took two or three steps to their first token where
   * one would do (README, W3).
   */
  private holdForReturns(slotClass: number): void {
    if (this.hold !== null) return;
    const ms = this.steps.returnHoldMs(slotClass, performance.now());
    if (ms <= 0) return;
    const release = this.pause();
    const timer = setTimeout(() => this.endHold(), ms);
    this.hold = { slotClass, release, timer, arriving: 0 };
  }

  /** Ends the hold once everyone expected is in: no ended stream's client still out, none arrived but untrimmed. */
  private endHoldIfAllIn(): void {
    const h = this.hold;
    if (h !== null && h.arriving === 0 && this.steps.expectedReturns(h.slotClass, performance.now()) === 0) this.endHold();
  }

  private endHold(): void {
    const h = this.hold;
    if (h === null) return;
    this.hold = null;
    clearTimeout(h.timer);
    h.release();
  }

  private async waitIfPaused(slotClass: number): Promise<void> {
    while (this.resumeGate !== null) {
      this.steps.paused(slotClass, 1);
      await this.resumeGate;
      this.steps.paused(slotClass, -1);
    }
  }

  private async run(job: Job, slot: Slot): Promise<void> {
    const { req, sink } = job;
    const prompt = req.promptTokens;
    let cached = 0;
    let generatedCount = 0;
    const usage = (): Usage => ({ promptTokens: prompt.length, completionTokens: generatedCount, cachedTokens: cached });
    const timeline = req.timeline;
    try {
      timeline.startedAt = performance.now();
      timeline.slot = slot.seq.index;
      sink.onStart();
      // Reuse the KV of the shared prefix; at least one prompt token must be evaluated to get logits.
      // A dirty slot (a failed step) reuses nothing and is cleared whole.
      const held = slot.dirty ? undefined : slot.seq.heldTokens();
      cached = held ? Math.min(commonPrefix(held, prompt), prompt.length - 1) : 0;
      timeline.cachedTokens = cached;
      if (held === undefined || held.length > cached) {
        await this.whilePaused(() => slot.seq.truncate(cached));
        slot.dirty = false;
      }
      timeline.trimmedAt = performance.now();
      const returned = job.returning !== null;
      if (returned) {
        // Its slot is ready: the hold may end (every loop then asks for the same step).
        job.returning!.arriving--;
        job.returning = null;
        this.endHoldIfAllIn();
      }
      let input = prompt.slice(cached);
      if (req.promptLogprobs) {
        // Scoring needs the distribution at every prompt position: evaluate the whole prompt
        // (no prefix reuse), then generate from its last token again.
        await this.whilePaused(() => slot.seq.truncate(0));
        cached = 0;
        timeline.cachedTokens = 0;
        sink.onPromptLogprobs?.(this.promptLogprobs(prompt, await slot.seq.score(prompt), req.logprobs ?? 0));
        await this.whilePaused(() => slot.seq.truncate(prompt.length - 1));
        input = prompt.slice(-1);
      }
      const result: { logprobSum?: number; stopString?: string } = {};
      const outcome = req.maxTokens === 0 ? "length" : await this.generate(req, slot.seq, input, sink, (n) => (generatedCount = n), result, returned);
      this.end(job, outcome instanceof ApiError ? { error: outcome, usage: usage() } : { result: { finishReason: outcome, usage: usage(), ...result } });
    } catch (err) {
      // A failed decode step fails every request in that batch (llama.cpp's scope); each
      // slot involved is cleared before reuse and the scheduler keeps serving.
      slot.dirty = true;
      this.end(job, { error: new ApiError("model_error", `The model failed while generating: ${(err as Error)?.message ?? err}`, { cause: err }), usage: usage() });
    } finally {
      timeline.endedAt = performance.now();
      slot.busy = false;
      slot.lastUsed = timeline.endedAt;
      this.recordCompletion();
      this.pump();
    }
  }

  /** Settles submit()'s promise, exactly once: the sink gets nothing after this. */
  private end(job: Job, outcome: GenerationOutcome): void {
    if (job.ended) return;
    job.ended = true;
    job.settle(outcome);
  }

  private recordCompletion(): void {
    this.completions.push(performance.now());
    if (this.completions.length > 64) this.completions.shift();
  }

  private checkLive(req: GenerationRequest): ApiError | undefined {
    if (this.terminating) return this.terminating;
    if (req.signal.aborted) return abortReason(req.signal);
    if (performance.now() > req.deadline) {
      return new ApiError("timeout", "The request's deadline passed during generation.", { code: "generation_timeout" });
    }
    return undefined;
  }

  /** One token's log probability and its `top` most likely alternatives, from the distribution it was sampled from. */
  private logprobEntry(token: Token, probabilities: ReadonlyMap<Token, number> | undefined, top: number, before: readonly Token[]): TokenLogprob {
    const { text, bytes } = this.model.tokenText(token, before);
    const p = probabilities?.get(token);
    const entry: TokenLogprob = { token: text, logprob: p !== undefined && p > 0 ? Math.log(p) : -9999, bytes, top: [] };
    if (top > 0 && probabilities) {
      // The `top` largest of up to a vocabulary's entries: a small sorted buffer, no full sort.
      const best: Array<[Token, number]> = [];
      for (const [t, q] of probabilities) {
        if (best.length === top && q <= best[top - 1]![1]) continue;
        let i = best.length;
        while (i > 0 && best[i - 1]![1] < q) i--;
        best.splice(i, 0, [t, q]);
        if (best.length > top) best.pop();
      }
      for (const [t, q] of best) {
        const tt = this.model.tokenText(t, before);
        entry.top.push({ token: tt.text, logprob: Math.log(q), bytes: tt.bytes });
      }
    }
    return entry;
  }

  private promptLogprobs(prompt: readonly Token[], next: Array<ReadonlyMap<Token, number> | undefined>, top: number): Array<TokenLogprob | null> {
    return prompt.map((t, i) => (i === 0 ? null : this.logprobEntry(t, next[i - 1], top, prompt.slice(Math.max(0, i - 4), i))));
  }

  /**
   * The bias the sampler gets: logit_bias, and while fewer than min_tokens are out, a ban
   * on end-of-generation and stop tokens (a function: the sampler asks before each token).
   */
  private tokenBiasFor(req: GenerationRequest, generated: readonly Token[]): unknown {
    const bias = req.sampling.logitBias;
    const minTokens = req.minTokens ?? 0;
    if (minTokens <= 0) return bias ? this.model.makeTokenBias(bias) : undefined;
    const banned = new Map(bias);
    for (const t of this.model.eogTokens) banned.set(t, -Infinity);
    for (const t of req.stopTokenIds ?? []) banned.set(t, -Infinity);
    const early = this.model.makeTokenBias(banned);
    const later = this.model.makeTokenBias(bias ?? new Map());
    return () => (generated.length < minTokens ? early : later);
  }

  /** The token loop. Returns the finish reason, or the error that ended it early. */
  private async generate(
    req: GenerationRequest,
    seq: SlotSequence,
    input: Token[],
    sink: TokenSink,
    count: (n: number) => void,
    result: { logprobSum?: number; stopString?: string },
    /** It came back during a hold for returning clients, which gathered it: no arrival gate. */
    returned = false,
  ): Promise<FinishReason | ApiError> {
    const priority = EVALUATION_PRIORITY[req.priority];
    const steps = this.steps;
    const slotClass = seq.slotClass;
    // Unasked-for max_tokens means "until the context is full": this slot's context.
    const maxTokens = req.fillsContext ? Math.min(req.maxTokens, seq.ctxSize - req.promptTokens.length) : req.maxTokens;
    const gathering = returned ? undefined : steps.arrivalGate(slotClass);
    if (gathering !== undefined) await gathering;
    steps.add(slotClass, 1);
    // Unsettled until its first token (StepGate.dispatchSchedule).
    steps.unsettle(slotClass, 1);
    let firstTokenPending = true;
    const settle = () => {
      if (!firstTokenPending) return;
      firstTokenPending = false;
      steps.unsettle(slotClass, -1);
    };
    let stillRunning = true;
    /** The step carrying this loop's last token, once it has asked for it (StepTracker.askedFinalStep). */
    let finalStep: number | undefined;
    const stopRunning = () => {
      settle();
      if (!stillRunning) return;
      steps.add(slotClass, -1);
      stillRunning = false;
      steps.loopEnded(slotClass, finalStep, performance.now());
    };
    try {
      // Long prompts go in chunks so a cancel or deadline is honoured between them.
      let rest = input;
      while (rest.length > this.prefillChunk) {
        await this.waitIfPaused(slotClass);
        const dead = this.checkLive(req);
        if (dead) return dead;
        await seq.prefill(rest.slice(0, this.prefillChunk), priority);
        rest = rest.slice(this.prefillChunk);
      }

      const generated: Token[] = [];
      const detok = new Utf8Detokenizer((t, last) => this.model.detokenize(t, last), req.promptTokens);
      const stopper = new StopMatcher(req.stop);
      // Only what was asked for costs anything per token: probabilities for logprobs, the
      // chosen token's probability for best_of.
      const probe: (StepProbe & { want: "probabilities" | "confidence" }) | undefined =
        req.logprobs !== undefined ? { want: "probabilities", probabilities: undefined, confidence: undefined } : req.scoreChoice ? { want: "confidence", probabilities: undefined, confidence: undefined } : undefined;
      const pending: TokenLogprob[] | undefined = req.logprobs !== undefined ? [] : undefined;
      const stopIds = req.stopTokenIds;
      const minTokens = req.minTokens ?? 0;
      // Read as each step is formed, once this loop has the tokens before it: whether it will
      // ask for one more, and nothing is about to join the step after (StepTracker.quietFor).
      const moreWanted = () => stillRunning && generated.length + 1 < maxTokens && this.resumeGate === null && steps.quietFor(slotClass, performance.now());
      const iter = seq.generate(rest, req.sampling, generated, { grammar: req.grammar, tokenBias: this.tokenBiasFor(req, generated), probe, moreWanted });
      let finish: FinishReason | ApiError = "length";
      let hitStopString = false;
      let lastTokenAt = 0;
      let logprobSum = 0;
      // The next step is asked for as soon as a token arrives, before that token's text is
      // made and written: the decode runs on a worker thread, so this token's JS work (text,
      // stop strings, the SSE or WebSocket frame) overlaps the next token's decode instead
      // of adding to it. Not when this token must be the last (max_tokens), a pause is
      // pending, or the request is dead; a stop string found in its text wastes that one step.
      let next: Promise<IteratorResult<Token, void>> | undefined;
      try {
        for (;;) {
          if (next === undefined) {
            if (this.resumeGate !== null) await this.waitIfPaused(slotClass);
            const dead = this.checkLive(req);
            if (dead) {
              finish = dead;
              break;
            }
            next = iter.next();
            if (generated.length + 1 >= maxTokens) finalStep = steps.askedFinalStep(slotClass);
          }
          const step = await next;
          next = undefined;
          if (step.done === true) {
            finish = "stop";
            break;
          }
          const token = step.value;
          settle();
          if (stopIds !== undefined && stopIds.has(token) && generated.length >= minTokens) {
            finish = "stop";
            break;
          }
          // The probe holds this step's figures until the next step is asked for.
          if (probe !== undefined) {
            if (pending !== undefined) pending.push(this.logprobEntry(token, probe.probabilities, req.logprobs!, generated.length > 0 ? generated.slice(-4) : req.promptTokens.slice(-4)));
            else logprobSum += Math.log(Math.max(probe.confidence ?? 1e-30, 1e-30));
          }
          // Before the next step: penalties and token biases read what was generated.
          generated.push(token);
          // Streams ended with this step: their clients may be about to come back.
          if (this.hold === null && steps.endingNow(slotClass) > 0) this.holdForReturns(slotClass);
          if (generated.length < maxTokens && this.resumeGate === null && this.checkLive(req) === undefined) {
            next = iter.next();
            if (generated.length + 1 >= maxTokens) finalStep = steps.askedFinalStep(slotClass);
          }
          const now = performance.now();
          if (lastTokenAt === 0) req.timeline.firstTokenAt = now;
          else {
            steps.observer?.interTokenLatency((now - lastTokenAt) / 1000);
            steps.noteStepTime(slotClass, now - lastTokenAt);
          }
          lastTokenAt = now;
          // This token's text and frame wait until the next step is formed, so that they run
          // beside it rather than before it (StepTracker.writesWaitForNextStep). `next`
          // settling first means the step failed to form (an error, an unload).
          if (next !== undefined && steps.writesWaitForNextStep(slotClass)) await Promise.race([steps.nextStepFormed(slotClass), next]).catch(() => undefined);
          const text = detok.push(token);
          if (text !== "") {
            const out = stopper.push(text);
            if (out.text !== "") sink.onText(out.text, pending?.splice(0));
            if (out.stopped) {
              if (req.includeStopString && out.matched) sink.onText(out.matched, pending?.splice(0));
              result.stopString = out.matched;
              finish = "stop";
              hitStopString = true;
              break;
            }
          }
          if (generated.length >= maxTokens) break;
        }
      } finally {
        count(generated.length);
        if (probe?.want === "confidence") result.logprobSum = logprobSum;
        stopRunning();
        // An end no step foresaw (end of generation, a stop): hold for its client from here.
        if (this.hold === null) this.holdForReturns(slotClass);
        // A step asked for ahead ends before the generator can close; its token is dropped.
        if (next !== undefined) await next.catch(() => undefined);
        await iter.return();
      }
      if (finish instanceof ApiError || hitStopString) return finish;
      // A natural end: what the detokenizer held, then what the stop matcher held back.
      const out = stopper.push(detok.flush());
      if (out.text !== "") sink.onText(out.text, pending?.splice(0));
      if (out.stopped) {
        if (req.includeStopString && out.matched) sink.onText(out.matched, pending?.splice(0));
        result.stopString = out.matched;
        return "stop";
      }
      const held = stopper.flush();
      if (held !== "" || (pending !== undefined && pending.length > 0)) sink.onText(held, pending?.splice(0));
      return finish;
    } finally {
      stopRunning();
    }
  }

  /** Ends every running generation at its next step with `error` (end of a shutdown grace). */
  terminate(error: ApiError): void {
    this.terminating = error;
  }

  /** Resolves when no slot is busy, or after `ms`; true when idle. */
  async idle(ms: number): Promise<boolean> {
    const end = performance.now() + ms;
    while (this.busySlots > 0) {
      if (performance.now() >= end) return false;
      await new Promise((r) => setTimeout(r, 10));
    }
    return true;
  }

  /** Refuses new work and fails what is queued; running generations are left to finish. */
  close(): void {
    this.closed = true;
    for (const job of this.queue.drain()) {
      this.queuedTokens -= job.req.promptTokens.length;
      this.unwatch(job);
      this.end(job, { error: new ApiError("unavailable", "The server is shutting down.", { retryAfter: 5, code: "shutting_down" }), usage: undefined });
    }
  }
}

function commonPrefix(a: readonly Token[], b: readonly Token[]): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}
