/**
 * Scheduling logic against a fake engine (allowed for unit tests of the scheduler; every
 * feature here is also exercised through the real engine elsewhere).
 */
import { describe, expect, it } from "vitest";
import { ApiError } from "../src/errors.js";
import { Scheduler, type SchedulerModel, type SlotSequence } from "../src/scheduler/scheduler.js";
import { StepTracker } from "../src/scheduler/step-tracker.js";
import type { GenerationRequest, GenerationResult, TokenSink } from "../src/scheduler/types.js";
import { WaitingQueue } from "../src/scheduler/waiting-queue.js";
import { decodingSequencesQueuedIn, sequenceOf, StepGate, taggedPriority } from "../src/engine/batch-strategy.js";
import { GREEDY_SAMPLING, type GenerateOptions, type Token } from "../src/engine/types.js";

/** Token ids are branded numbers in node-llama-cpp; the fake uses plain ones. */
const tok = (xs: number[]) => xs as Token[];

class FakeSequence implements SlotSequence {
  held: Token[] = [];
  constructor(
    readonly index: number,
    private readonly stepMs: number,
    readonly slotClass = 0,
    readonly ctxSize = 1 << 20,
  ) {}
  heldTokens() {
    return this.held;
  }
  async truncate(from: number) {
    this.held = this.held.slice(0, from);
  }
  async prefill(tokens: Token[]) {
    this.held.push(...tokens);
  }
  async score(tokens: Token[]) {
    this.held.push(...tokens);
    return tokens.map(() => undefined);
  }
  /** What the loop said, as each step was formed: tokens it had, and whether it wanted the step after (GenerateOptions.moreWanted). */
  readonly wantReadings: Array<{ had: number; more: boolean }> = [];
  async *generate(tokens: Token[], _sampling?: unknown, _generated?: Token[], extras?: GenerateOptions): AsyncGenerator<Token, void, void> {
    this.held.push(...tokens);
    for (let i = 0; ; i++) {
      if (extras?.moreWanted !== undefined) this.wantReadings.push({ had: i, more: extras.moreWanted() });
      await new Promise((r) => setTimeout(r, this.stepMs));
      const t = (i % 26) as Token;
      yield t;
      this.held.push(t);
    }
  }
}

/** `slots`: a count (one class of unbounded slots), or slot classes as [count, ctxSize] pairs, smallest first. */
function fakeModel(slots: number | Array<[number, number]>, stepMs = 2): SchedulerModel & { sequences: FakeSequence[] } {
  const classes: Array<[number, number]> = typeof slots === "number" ? [[slots, 1 << 20]] : slots;
  const sequences: FakeSequence[] = [];
  classes.forEach(([count, ctx], c) => {
    for (let i = 0; i < count; i++) sequences.push(new FakeSequence(sequences.length, stepMs, c, ctx));
  });
  return {
    id: "fake",
    sequences,
    detokenize: (tokens) => tokens.map((t) => String.fromCharCode(97 + t)).join(""),
    makeTokenBias: () => undefined,
    tokenText: (t) => ({ text: String.fromCharCode(97 + t), bytes: [97 + t] }),
    eogTokens: [],
  };
}

function request(over: Partial<GenerationRequest> = {}): GenerationRequest {
  return {
    promptTokens: tok([1, 2, 3]),
    maxTokens: 5,
    stop: [],
    sampling: GREEDY_SAMPLING,
    priority: "normal",
    deadline: performance.now() + 10_000,
    signal: new AbortController().signal,
    timeline: {},
    ...over,
  };
}

interface Recorder {
  r: { name: string; text: string; result: GenerationResult | undefined; error: ApiError | undefined; started: boolean };
  sink: TokenSink;
}

function recorder(name = ""): Recorder {
  const r = { name, text: "", result: undefined as GenerationResult | undefined, error: undefined as ApiError | undefined, started: false };
  const sink: TokenSink = {
    onStart: () => (r.started = true),
    onText: (t) => (r.text += t),
  };
  return { r, sink };
}

/** Submits (throwing at once when refused) and records the outcome when it settles. */
function run(s: Scheduler, req: GenerationRequest, rec: Recorder = recorder()): Promise<void> {
  return s.submit(req, rec.sink).then((o) => {
    if ("result" in o) rec.r.result = o.result;
    else rec.r.error = o.error;
  });
}

function scheduler(slots: number | Array<[number, number]>, maxQueue: number, stepMs = 2) {
  const model = fakeModel(slots, stepMs);
  const s = new Scheduler(model, new StepTracker(undefined), { maxQueue });
  return { s, model };
}

describe("Scheduler admission", () => {
  it("refuses beyond the queue bound with 429, overloaded and a Retry-After", async () => {
    const { s } = scheduler(1, 1);
    const a = recorder();
    const b = recorder();
    const running = run(s, request({ maxTokens: 50 }), a);
    const queued = run(s, request(), b);
    expect(s.waiting).toBe(1);
    let refused: unknown;
    try {
      void run(s, request());
    } catch (e) {
      refused = e;
    }
    expect(refused).toBeInstanceOf(ApiError);
    expect((refused as ApiError).status).toBe(429);
    expect((refused as ApiError).type).toBe("overloaded_error");
    expect((refused as ApiError).retryAfter).toBeGreaterThanOrEqual(1);
    await Promise.all([running, queued]);
    // Once the queue drains, the next request is admitted.
    const c = recorder();
    await run(s, request(), c);
    expect(c.r.result?.finishReason).toBe("length");
  });

  it("a deadline that passes in the queue ends the request with a timeout before it starts", async () => {
    const { s } = scheduler(1, 4);
    const a = recorder();
    const b = recorder();
    const first = run(s, request({ maxTokens: 40 }), a);
    await run(s, request({ deadline: performance.now() + 20 }), b);
    expect(b.r.started).toBe(false);
    expect(b.r.error?.kind).toBe("timeout");
    expect(b.r.error?.status).toBe(504);
    expect(s.waiting).toBe(0);
    await first;
  });

  it("a cancelled request leaves the queue at once", async () => {
    const { s } = scheduler(1, 4);
    const first = run(s, request({ maxTokens: 40 }));
    const ac = new AbortController();
    const b = recorder();
    const queued = run(s, request({ signal: ac.signal }), b);
    expect(s.waiting).toBe(1);
    ac.abort();
    expect(s.waiting).toBe(0);
    await queued;
    expect(b.r.error?.kind).toBe("cancelled");
    await first;
  });

  it("a deadline mid-generation stops it with a timeout and frees the slot", async () => {
    const { s } = scheduler(1, 4, 5);
    const a = recorder();
    await run(s, request({ maxTokens: 10_000, deadline: performance.now() + 50 }), a);
    expect(a.r.started).toBe(true);
    expect(a.r.error?.kind).toBe("timeout");
    expect(s.busySlots).toBe(0);
  });

  it("higher priority is admitted first", async () => {
    const { s } = scheduler(1, 8);
    const order: string[] = [];
    const track = (name: string): Recorder => {
      const rec = recorder(name);
      return { ...rec, sink: { ...rec.sink, onStart: () => order.push(name) } };
    };
    const blocker = run(s, request({ maxTokens: 20 }));
    const all = [
      run(s, request({ priority: "low" }), track("low")),
      run(s, request({ priority: "normal" }), track("normal")),
      run(s, request({ priority: "high" }), track("high")),
    ];
    await Promise.all([blocker, ...all]);
    expect(order).toEqual(["high", "normal", "low"]);
  });

  it("prefers the free slot whose KV shares the longest prefix, and reports the cached tokens", async () => {
    const { s, model } = scheduler(3, 4);
    model.sequences[0]!.held = tok([9, 9, 9]);
    model.sequences[1]!.held = tok([1, 2, 3, 4, 7, 7]);
    model.sequences[2]!.held = tok([1, 2]);
    const a = recorder();
    await run(s, request({ promptTokens: tok([1, 2, 3, 4, 5]), maxTokens: 1 }), a);
    expect(a.r.result?.usage.cachedTokens).toBe(4);
    expect(model.sequences[1]!.held.slice(0, 5)).toEqual([1, 2, 3, 4, 5]);
  });

  it("stop strings cut the text and finish with stop", async () => {
    const { s } = scheduler(1, 4);
    const a = recorder();
    // The fake generates a, b, c, d, ...
    await run(s, request({ maxTokens: 20, stop: ["cd"] }), a);
    expect(a.r.text).toBe("ab");
    expect(a.r.result?.finishReason).toBe("stop");
  });

  it("close() refuses new work with 503 and fails what waits", async () => {
    const { s } = scheduler(1, 4);
    const first = run(s, request({ maxTokens: 20 }));
    const b = recorder();
    const queued = run(s, request(), b);
    s.close();
    await queued;
    expect(b.r.error?.status).toBe(503);
    expect(() => run(s, request())).toThrow(/shutting down/);
    await first;
  });
});

describe("slot classes", () => {
  it("a request takes the smallest class it fits; one too long for it runs in the larger class", async () => {
    const { s, model } = scheduler([[2, 16], [1, 64]], 4);
    const small = request({ promptTokens: tok([1, 2, 3]), maxTokens: 5, timeline: {} });
    await run(s, small);
    expect(model.sequences[small.timeline.slot!]!.ctxSize).toBe(16);
    const long = request({ promptTokens: tok(Array.from({ length: 20 }, (_, i) => i + 1)), maxTokens: 10, timeline: {} });
    const rec = recorder();
    await run(s, long, rec);
    expect(model.sequences[long.timeline.slot!]!.ctxSize).toBe(64);
    expect(rec.r.result?.finishReason).toBe("length");
  });

  it("while the small class is busy, a fitting request takes a free larger slot instead of waiting", async () => {
    const { s, model } = scheduler([[1, 16], [1, 64]], 4, 5);
    const busy = request({ maxTokens: 10, timeline: {} });
    const first = run(s, busy);
    const second = request({ maxTokens: 5, timeline: {} });
    await run(s, second);
    expect(model.sequences[busy.timeline.slot!]!.ctxSize).toBe(16);
    expect(model.sequences[second.timeline.slot!]!.ctxSize).toBe(64);
    await first;
  });

  it("a request waiting for the busy large class does not hold up those that fit the small one", async () => {
    const { s, model } = scheduler([[1, 16], [1, 64]], 4, 5);
    const order: string[] = [];
    const track = (name: string): Recorder => {
      const rec = recorder(name);
      return { ...rec, sink: { ...rec.sink, onStart: () => order.push(name) } };
    };
    const big = () => request({ promptTokens: tok(Array.from({ length: 20 }, (_, i) => i + 1)), maxTokens: 30, timeline: {} });
    const runs = [run(s, big(), track("big1")), run(s, big(), track("big2")), run(s, request({ maxTokens: 3 }), track("small"))];
    await Promise.all(runs);
    // big2 waits for the large slot; small, which came after it, starts in the small slot first.
    expect(order).toEqual(["big1", "small", "big2"]);
    expect(model.sequences.map((q) => q.ctxSize)).toEqual([16, 64]);
  });

  it("without max_tokens a request fills the context of the slot it got", async () => {
    const { s } = scheduler([[1, 16], [1, 64]], 4);
    const rec = recorder();
    await run(s, request({ promptTokens: tok([1, 2, 3]), maxTokens: 61, fillsContext: true }), rec);
    expect(rec.r.result).toMatchObject({ finishReason: "length", usage: { completionTokens: 13 } });
  });

  it("a larger slot that holds the conversation's prefix is taken over a smaller empty one", async () => {
    const { s, model } = scheduler([[1, 128], [1, 512]], 4);
    const conversation = tok(Array.from({ length: 80 }, (_, i) => (i % 50) + 1));
    model.sequences[1]!.held = [...conversation];
    const req = request({ promptTokens: tok([...conversation, 7, 8]), maxTokens: 4, timeline: {} });
    const rec = recorder();
    await run(s, req, rec);
    expect(req.timeline.slot).toBe(1);
    expect(rec.r.result?.usage.cachedTokens).toBe(80);
  });
});

describe("sequence contiguity", () => {
  it("a new request takes the free slot that keeps the busy slots consecutive (llama.cpp decodes consecutive sequence ids in one pass)", async () => {
    const { s, model } = scheduler(6, 4, 5);
    const running = [0, 1, 2, 3].map(() => request({ maxTokens: 30, timeline: {} }));
    const runs = running.map((r) => run(s, r));
    expect(running.map((r) => r.timeline.slot)).toEqual([0, 1, 2, 3]);
    // Slot 5 holds this prompt's prefix, but taking it would split the step in two.
    model.sequences[5]!.held = tok([1, 2, 3]);
    const next = request({ maxTokens: 2, timeline: {} });
    await run(s, next);
    expect(next.timeline.slot).toBe(4);
    await Promise.all(runs);
  });

  it("a step is formed in a microtask only where every running sequence has asked for its next token; a prompt in the queue, one still to ask, or a loop unsettled keeps node-llama-cpp's turn of the event loop", async () => {
    let running = 1;
    let decoding = 1;
    let unsettled = 0;
    const gate = new StepGate({ expectedItems: () => running, unsettledLoops: () => unsettled, onStep: () => {} }, undefined);
    gate.decodingSequencesQueued = () => decoding;
    const when = async (): Promise<string> => {
      const order: string[] = [];
      setImmediate(() => order.push("turn"));
      gate.dispatchSchedule(() => order.push("step"));
      await new Promise((r) => setImmediate(r));
      return order.join(" ");
    };
    expect(await when()).toBe("step turn");
    running = 2;
    expect(await when()).toBe("turn step");
    decoding = 2;
    expect(await when()).toBe("step turn");
    // A loop before its first token, or paused (a hold, a KV trim).
    unsettled = 1;
    expect(await when()).toBe("turn step");
    unsettled = 0;
    // An observer that cannot say: the turn.
    const unsure = new StepGate({ expectedItems: () => 1, onStep: () => {} }, undefined);
    unsure.decodingSequencesQueued = () => 1;
    const order: string[] = [];
    setImmediate(() => order.push("turn"));
    unsure.dispatchSchedule(() => order.push("step"));
    await new Promise((r) => setImmediate(r));
    expect(order).toEqual(["turn", "step"]);
    // A prompt queued (the count reads 0), as two requests arriving together start one microtask apart.
    decoding = 0;
    running = 0;
    expect(await when()).toBe("turn step");
    // Read from node-llama-cpp's queue: one-token items only.
    const queue = (...lengths: number[]) => decodingSequencesQueuedIn({ _queuedDecodes: lengths.map((n) => ({ tokens: new Array(n).fill(1) })) } as never)();
    expect([queue(1, 1), queue(1, 5), queue(), decodingSequencesQueuedIn({} as never)()]).toEqual([2, 0, 0, 0]);
  });

  it("the batch strategy puts a step's items in sequence order, read from their tagged priorities", () => {
    const items = [7, 2, 5, 0].map((seq) => ({ tokens: [1], logits: [true], evaluationPriority: taggedPriority(seq === 2 ? 1 : 5, seq) }));
    const observer = { expectedItems: () => 0, onStep: () => {} };
    const gate = new StepGate(observer, undefined);
    const out = gate.strategy({ items: items as never, size: 512 });
    expect(out.map((p) => sequenceOf(p.item))).toEqual([0, 2, 5, 7]);
    expect(Math.floor(items[1]!.evaluationPriority)).toBe(1);
    // Which sequence a lone step is for (what a step run ahead is checked against): none here, 5 alone.
    expect(gate.stepSequenceIds.slice(0, gate.stepSequences)).toEqual([0, 2, 5, 7]);
    gate.strategy({ items: [items[2]!] as never, size: 512 });
    expect([gate.stepSequenceIds.slice(0, gate.stepSequences), gate.stepTokens]).toEqual([[5], 1]);
  });
});

describe("WaitingQueue", () => {
  it("orders by priority, first come first served within a class, and ages so low priority is never starved", () => {
    const q = new WaitingQueue<{ priority: "high" | "normal" | "low"; enqueuedAt: number; name: string }>(10);
    q.push({ priority: "low", enqueuedAt: 0, name: "old-low" });
    q.push({ priority: "normal", enqueuedAt: 1000, name: "n1" });
    q.push({ priority: "normal", enqueuedAt: 2000, name: "n2" });
    q.push({ priority: "high", enqueuedAt: 3000, name: "h" });
    expect(q.shift(3000)!.name).toBe("h");
    expect(q.shift(3000)!.name).toBe("n1");
    expect(q.shift(3000)!.name).toBe("n2");
    // After 25 s the old low request outranks a fresh normal one.
    q.push({ priority: "normal", enqueuedAt: 25_000, name: "n3" });
    expect(q.shift(25_000)!.name).toBe("old-low");
  });
});

describe("arrivals at an idle model (the scheduler delay factor)", () => {
  /** Turns of the event loop so far, while a test counts them. */
  let turns = 0;
  /** A fake whose sequences record in which turn of the event loop each generation's token loop started. */
  function timedModel(stepMs: number) {
    const model = fakeModel(4, stepMs);
    const starts: number[] = [];
    for (const seq of model.sequences) {
      const generate = seq.generate.bind(seq);
      seq.generate = (tokens: Token[]) => {
        starts.push(turns);
        return generate(tokens);
      };
    }
    return { model, starts };
  }

  /** In how many turns of the event loop the second burst's three loops started. */
  async function staggered(delayFactor: number): Promise<number> {
    let counting = true;
    const tick = (): void => {
      turns++;
      if (counting) setImmediate(tick);
    };
    setImmediate(tick);
    try {
      return await burst(delayFactor);
    } finally {
      counting = false;
    }
  }

  async function burst(delayFactor: number): Promise<number> {
    const { model, starts } = timedModel(40);
    const s = new Scheduler(model, new StepTracker(undefined, delayFactor), { maxQueue: 8 });
    // One request alone first: the tracker learns a step's time (40 ms) from its tokens.
    await run(s, request({ maxTokens: 3 }));
    starts.length = 0;
    // Three requests at least 1 ms apart (timers) at the now idle model, twice: the first
    // burst teaches the tracker that arrivals come in bursts; the second is measured.
    for (let round = 0; round < 2; round++) {
      starts.length = 0;
      const done: Array<Promise<void>> = [];
      for (let i = 0; i < 3; i++) {
        done.push(run(s, request({ maxTokens: 1 })));
        await new Promise((r) => setTimeout(r, 1));
      }
      await Promise.all(done);
    }
    return new Set(starts).size;
  }

  it("with a delay factor they start together; without, each as it came", async () => {
    // 0.5 × 40 ms, capped: a 5 ms wait, which the three arrivals (2 ms or a little more from first to last) fall in.
    // Together they start in one turn of the event loop; without, each in the turn its timer
    // fired in. (Counted in turns, not milliseconds: a loaded CI machine once spread one
    // turn's three starts over 1.24 ms.)
    expect(await staggered(0.5)).toBe(1);
    expect(await staggered(0)).toBeGreaterThanOrEqual(2);
  });

  it("waits only at an idle class whose arrivals come in bursts, only when steps are long enough to matter, and at most 5 ms", async () => {
    const t = new StepTracker(undefined, 0.5);
    expect(t.arrivalGate(0)).toBeUndefined(); // no step time known yet
    t.noteStepTime(0, 0.3);
    expect(t.arrivalGate(0)).toBeUndefined(); // 0.15 ms: not worth a timer
    t.noteStepTime(1, 200);
    expect(t.arrivalGate(1)).toBeUndefined(); // a request alone so far starts at once
    t.add(1, 1);
    expect(t.arrivalGate(1)).toBeUndefined(); // running: the next step gathers it; but it came right after an idle start
    t.add(1, -1);
    const gate = t.arrivalGate(1); // so the next idle start waits
    expect(gate).toBeDefined();
    expect(t.arrivalGate(1)).toBe(gate); // and later arrivals share the wait
    await gate;
    const again = t.arrivalGate(1); // its wait gathered someone: it keeps waiting
    expect(again).toBeDefined();
    await again;
    expect(t.arrivalGate(1)).toBeUndefined(); // that one gathered no one: a request alone starts at once again
    expect(StepTracker.MAX_ARRIVAL_WAIT_MS).toBe(5);
  });

  it("a class whose loops are paused (another request's KV trim) is not idle: an arrival then starts at once", () => {
    const t = new StepTracker(undefined, 0.5);
    t.noteStepTime(0, 20);
    // Learn that arrivals come in bursts: one right after an idle start.
    expect(t.arrivalGate(0)).toBeUndefined();
    t.add(0, 1);
    expect(t.arrivalGate(0)).toBeUndefined();
    t.add(0, 1);
    // Both loops pause before their next step: none running, two paused, both unsettled.
    t.paused(0, 1);
    t.paused(0, 1);
    expect([t.expectedItems(0), t.unsettledLoops(0)]).toEqual([0, 2]);
    // Without the paused count this arrival waited out a gate, and missed the step the
    // trim's own request started in (1.5 ms, then a whole step, on the W2 model at c=8).
    expect(t.arrivalGate(0)).toBeUndefined();
    t.paused(0, -1);
    t.paused(0, -1);
    expect([t.expectedItems(0), t.unsettledLoops(0)]).toEqual([2, 0]);
    // Truly idle again: it waits.
    t.add(0, -2);
    expect(t.arrivalGate(0)).toBeDefined();
  });

  it("the scheduler counts loops held by a KV trim as paused: a request arriving meanwhile starts without the arrival wait", async () => {
    const model = fakeModel(4, 20);
    const t = new StepTracker(undefined, 0.5);
    // A 20 ms step (a 5 ms arrival wait), and arrivals known to come in bursts.
    t.noteStepTime(0, 20);
    t.arrivalGate(0);
    t.add(0, 1);
    t.arrivalGate(0);
    t.add(0, -1);
    const waits: Array<Promise<void> | undefined> = [];
    const gate = t.arrivalGate.bind(t);
    t.arrivalGate = (c: number) => {
      const w = gate(c);
      waits.push(w);
      return w;
    };
    const s = new Scheduler(model, t, { maxQueue: 8 });
    // Two arrivals share a wait (so arrivals still come in bursts); a runs on, the other ends.
    const a = recorder("a");
    const runningA = run(s, request({ maxTokens: 10 }), a);
    await run(s, request({ maxTokens: 1 }));
    expect(waits.filter((w) => w !== undefined).length).toBe(2);
    while (a.r.text.length === 0) await new Promise((r) => setImmediate(r));
    // A request for the ended one's slot, whose KV must be trimmed first; the trim is held until released.
    const ended = model.sequences[1]!;
    expect(ended.held.length).toBeGreaterThan(0);
    let release!: () => void;
    const trimHeld = new Promise<void>((r) => (release = r));
    ended.truncate = () => trimHeld;
    const trimming = run(s, request({ promptTokens: tok([7, 7, 7]) }));
    // Loop a pauses before its next step: not running, unsettled.
    while (!(t.expectedItems(0) === 0 && t.unsettledLoops(0) === 1)) await new Promise((r) => setImmediate(r));
    const before = waits.length;
    const arriving = run(s, request());
    await new Promise((r) => setImmediate(r));
    // Without the paused count the class looked idle, and this arrival waited out a gate.
    expect(waits.length).toBe(before + 1);
    expect(waits[before]).toBeUndefined();
    release();
    await Promise.all([runningA, trimming, arriving]);
  });
});

describe("steps run ahead: when a loop says it wants the step after", () => {
  it("StepTracker.quietFor: not while a loop is starting, nor while an ended stream's client is expected", () => {
    const t = new StepTracker(undefined);
    t.noteStepTime(0, 40);
    expect(t.quietFor(0, 0)).toBe(true);
    t.unsettle(0, 1);
    expect(t.quietFor(0, 0)).toBe(false);
    t.unsettle(0, -1);
    t.loopEnded(0, undefined, 100);
    expect(t.quietFor(0, 101)).toBe(false);
    t.arrived(105);
    expect(t.quietFor(0, 106)).toBe(true);
    // Not back within a step (40 ms): no longer expected.
    t.loopEnded(0, undefined, 200);
    expect(t.quietFor(0, 241)).toBe(true);
  });

  it("a running loop wants more until its last step, except while another request starts or ends", async () => {
    const { s, model } = scheduler(2, 4, 3);
    const a = model.sequences[0]!;
    const long = run(s, request({ maxTokens: 30 }));
    while (a.wantReadings.length < 5) await new Promise((r) => setTimeout(r, 1));
    const before = a.wantReadings.length;
    await run(s, request({ maxTokens: 2 }));
    await long;
    const r = a.wantReadings;
    // Alone: every step but the first (its own start: a prompt's step never runs ahead) and the last wants the one after it.
    expect(r[0]!.more).toBe(false);
    expect(r.slice(1, before).every((x) => x.more)).toBe(true);
    expect(r.at(-1)).toEqual({ had: 29, more: false });
    // The other request's start and end (its client may come back) said no in between.
    expect(r.slice(before, -1).some((x) => !x.more)).toBe(true);
  });
});

describe("clients that come back (the hold for returning clients)", () => {
  /** A tracker with 40 ms steps that has seen six streams end, each client back 4 ms later, and a seventh end at 600 ms. */
  function learned(delayFactor: number): StepTracker {
    const t = new StepTracker(undefined, delayFactor);
    t.noteStepTime(0, 40);
    for (let i = 0; i < 6; i++) {
      t.loopEnded(0, undefined, i * 100);
      t.arrived(i * 100 + 4);
    }
    t.loopEnded(0, undefined, 600);
    return t;
  }

  it("learns whether ended streams' clients come back and how soon, and holds only where that pays", () => {
    const t = new StepTracker(undefined, 0.1);
    t.noteStepTime(0, 40);
    // Nothing learned yet: a stream ends, and the next step does not wait.
    t.loopEnded(0, undefined, 0);
    expect(t.expectedReturns(0, 1)).toBe(1);
    expect(t.returnHoldMs(0, 1)).toBe(0);
    // Clients come back 4 ms after each end, four times: the tracker learns it.
    let now = 0;
    for (let i = 0; i < 4; i++) {
      if (i > 0) t.loopEnded(0, undefined, now);
      t.arrived(now + 4);
      now += 100;
    }
    expect(t.returns.returnShare).toBeGreaterThan(0.5);
    expect(t.returns.latencyMs).toBeCloseTo(4, 5);
    expect(t.expectedReturns(0, now)).toBe(0);
    expect(t.returnHoldMs(0, now)).toBe(0); // no one expected: no hold
    // A loop asks for the step carrying its last token; when that step is the last formed, its end is expected now.
    const final = t.askedFinalStep(0);
    expect(t.endingNow(0)).toBe(0);
    t.onStep(0, 1, 1);
    expect(t.endingNow(0)).toBe(1);
    // The usual 4 ms, 4 × its spread (half the first delay, then a quarter less at each
    // return as punctual as the average), and 1.
    expect(t.returnHoldMs(0, now)).toBeCloseTo(4 + 4 * 2 * 0.75 ** 3 + 1, 5);
    t.loopEnded(0, final, now);
    expect(t.endingNow(0)).toBe(0);
    expect(t.expectedReturns(0, now)).toBe(1); // now an end waiting for its client
    // An end not followed by a return within a step (40 ms) counts against coming back.
    expect(t.expectedReturns(0, now + 41)).toBe(0);
    // Steps short beside the clients' delay (4 ms > a quarter of 10 ms): never worth holding.
    t.noteStepTime(1, 10);
    t.loopEnded(1, undefined, now + 50);
    expect(t.returnHoldMs(1, now + 50)).toBe(0);
    // Off with the delay factor.
    expect(learned(0).returnHoldMs(0, 600)).toBe(0);
  });

  it("clients that stop coming back stop the holds", () => {
    const t = learned(0.1);
    expect(t.returnHoldMs(0, 600)).toBeGreaterThan(0);
    // Now ends with no arrival after them (each found too late, beyond a step).
    for (let i = 7; i < 12; i++) t.loopEnded(0, undefined, i * 100);
    t.loopEnded(0, undefined, 1300);
    expect(t.returnHoldMs(0, 1300)).toBe(0);
  });
});

describe("a token's text and frame run beside the next step", () => {
  /** A hand-driven engine: every token loop that asks waits until `step()` forms a step (the tracker hears of it) and then gets its token. */
  function steppedModel(slots: number) {
    const model = fakeModel(slots);
    const asking: Array<(t: Token) => void> = [];
    for (const seq of model.sequences) {
      seq.generate = async function* (tokens: Token[]) {
        seq.held.push(...tokens);
        for (;;) yield await new Promise<Token>((resolve) => asking.push(resolve));
      };
    }
    return { model, asking };
  }

  /** Until `cond` holds, turning the event loop (observable state, no sleeps). */
  async function until(cond: () => boolean): Promise<void> {
    for (let i = 0; !cond(); i++) {
      if (i > 10_000) throw new Error("never happened");
      await new Promise((r) => setImmediate(r));
    }
  }

  async function order(loneStepsOnJsThread: boolean, loops: number): Promise<string[]> {
    const { model, asking } = steppedModel(loops);
    const tracker = new StepTracker(undefined, 0, loneStepsOnJsThread);
    const s = new Scheduler(model, tracker, { maxQueue: 8 });
    const events: string[] = [];
    const done = Array.from({ length: loops }, (_, i) => {
      const rec = recorder();
      rec.sink.onText = (t) => void events.push(`text ${i} ${t}`);
      return run(s, request({ maxTokens: 3 }), rec);
    });
    for (let step = 0; step < 3; step++) {
      await until(() => asking.length === loops);
      // The engine forms the step (what the batch strategy reports), hands it to a worker,
      // and the tokens come back a turn later.
      tracker.onStep(0, loops, loops);
      events.push(`step ${step}`);
      const waiting = asking.splice(0);
      await new Promise((r) => setImmediate(r));
      waiting.forEach((give) => give(step as Token));
    }
    await Promise.all(done);
    return events;
  }

  it("with several loops running, each token's text waits until the next step is formed", async () => {
    const events = await order(false, 2);
    // Token 0 ("a") arrives after step 0; its text comes only after step 1 is formed.
    expect(events.indexOf("text 0 a")).toBeGreaterThan(events.indexOf("step 1"));
    expect(events.indexOf("text 1 a")).toBeGreaterThan(events.indexOf("step 1"));
    expect(events.indexOf("text 0 a")).toBeLessThan(events.indexOf("step 2"));
    // The last token (max_tokens) asks for no step: written at once.
    expect(events.filter((e) => e.startsWith("text 0")).join()).toBe("text 0 a,text 0 b,text 0 c");
  });

  it("a lone loop whose steps run on the JavaScript thread writes at once; one whose steps go to jobs waits too", async () => {
    const here = await order(true, 1);
    expect(here.indexOf("text 0 a")).toBeLessThan(here.indexOf("step 1"));
    const jobs = await order(false, 1);
    expect(jobs.indexOf("text 0 a")).toBeGreaterThan(jobs.indexOf("step 1"));
  });
});
