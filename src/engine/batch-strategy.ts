/**
 * How each decode step's batch is formed: the one hook node-llama-cpp offers inside its
 * batching loop (`itemPrioritizationStrategy`).
 */
import type { BatchItem, LlamaContext, PrioritizedBatchItem } from "node-llama-cpp";
import type { EngineFaults, StepObserver } from "./types.js";

/**
 * Makes every decode step carry a token for every running sequence.
 *
 * node-llama-cpp re-forms the next batch as soon as the previous decode returns; a
 * sequence whose consumer is still a few microtasks away from asking for its next
 * token misses that step and joins the one after, so steps alternate half-full. While
 * fewer sequences are queued than are running, the strategy returns an empty batch,
 * which makes the loop go round once more after a microtask turn. The wait is bounded by
 * a spin count, so a sequence that is really waiting on I/O delays the others by
 * microseconds, never by a step.
 */
export class StepGate {
  private spins = 0;
  static readonly MAX_SPINS = 64;
  /** How many sequences and tokens the last batch formed carries. */
  stepSequences = 0;
  stepTokens = 0;
  /** The sequences (their ids in the context) of the last batch formed, in its order: its first `stepSequences`. */
  readonly stepSequenceIds: number[] = [];

  /** The last batch formed had an item of several tokens: llama.cpp may return its outputs out of order (step-calls.ts). */
  get mixedStep(): boolean {
    return this.stepTokens > this.stepSequences;
  }

  constructor(
    private readonly observer: StepObserver,
    private readonly faults: EngineFaults | undefined,
    /** The slot class whose context this gate forms batches for. */
    private readonly slotClass = 0,
  ) {}

  /** How many of this context's sequences have asked for the next token of a running generation, and nothing else (set once the context exists). */
  decodingSequencesQueued: () => number = () => 0;

  /**
   * When node-llama-cpp forms the next step once a sequence asks for one. Its own
   * schedule waits for the next turn of the event loop, so that the other sequences can
   * ask too. Where every running sequence has already asked for its next token, none can
   * join; a request still arriving is received in the turn that follows each step
   * (step-calls.ts) or while a step runs in a job. So that step is formed in a microtask
   * instead: a lone sequence's next step is handed to the steady thread (step-thread.ts)
   * in the same macrotask as its sample, before the token loop writes the token it gave,
   * and that write runs beside the step rather than before it (0.39 ms from one step's end
   * to the next one's start became 0.13 on the W2 model). The turn stays where a prompt is
   * in the queue, and wherever a loop of the class is still before its first token or is
   * paused (a hold, a KV trim): requests arriving together start their loops apart, a
   * fully cached prompt is one token too, and a step formed at once would take the context
   * lock that the next arrival's trim waits for (a first step that arrivals should share).
   */
  readonly dispatchSchedule = (dispatch: () => void): void => {
    const decoding = this.decodingSequencesQueued();
    if (decoding > 0 && decoding >= this.observer.expectedItems(this.slotClass) && (this.observer.unsettledLoops?.(this.slotClass) ?? 1) === 0) queueMicrotask(dispatch);
    else setImmediate(dispatch);
  };

  readonly strategy = ({ items, size }: { items: readonly BatchItem[]; size: number }): PrioritizedBatchItem[] => {
    if (items.length < this.observer.expectedItems(this.slotClass) && this.spins < StepGate.MAX_SPINS) {
      this.spins++;
      return [];
    }
    this.spins = 0;
    // Where a real decode failure would strike: the batch as it is about to be decoded.
    if (this.faults) this.injectFaults(items.length);
    // Sequence order: llama.cpp splits a step whose sequence ids are not consecutive and
    // increasing into several ubatches (one more pass over the weights each) when the KV
    // cache is per sequence, as node-llama-cpp's is.
    const batch = sequenceOrdered({ items, size });
    const tokens = tokensIn(batch);
    this.stepSequences = batch.length;
    this.stepTokens = tokens;
    for (let i = 0; i < batch.length; i++) this.stepSequenceIds[i] = sequenceOf(batch[i]!.item);
    this.observer.onStep(this.slotClass, batch.length, tokens);
    return batch;
  };

  /** A throw here is how llama.cpp's own decode failures reach callers: every queued item of the batch is rejected. */
  private injectFaults(items: number): void {
    const f = this.faults!;
    if (f.failNextSteps > 0 && items > 0) {
      f.failNextSteps--;
      throw new Error("injected decode failure");
    }
  }
}

/**
 * How many sequences node-llama-cpp has queued a step for, when every queued item is one
 * token (a generation's next token); 0 when any carries more (a prompt, a speculative
 * check), or where node-llama-cpp keeps no such queue: every step then waits a turn.
 */
export function decodingSequencesQueuedIn(context: LlamaContext): () => number {
  const c = context as unknown as { _queuedDecodes?: ReadonlyArray<{ tokens: ArrayLike<unknown> }> };
  return () => {
    const queued = c._queuedDecodes;
    if (queued === undefined) return 0;
    for (let i = 0; i < queued.length; i++) if (queued[i]!.tokens.length !== 1) return 0;
    return queued.length;
  };
}

/**
 * A fair share of the batch in sequence order, with no waiting and no observer: how a
 * draft model's context forms its steps (its sequences mirror the target's slots).
 */
/** The tokens a batch evaluates. */
export function tokensIn(batch: readonly PrioritizedBatchItem[]): number {
  let tokens = 0;
  for (const b of batch) tokens += b.processAmount;
  return tokens;
}

export function sequenceOrdered({ items, size }: { items: readonly BatchItem[]; size: number }): PrioritizedBatchItem[] {
  return fairShare(items, size).sort((a, b) => sequenceOf(a.item) - sequenceOf(b.item));
}

/**
 * node-llama-cpp's batch items do not say which sequence they belong to, and llama.cpp
 * needs them in sequence order (see above). The only field an item carries from its
 * sequence is its evaluation priority (1–5), so each sequence adds its index as a
 * fraction: 3.0005 is priority 3 from sequence 4. Whole priorities still order as before.
 */
export const SEQUENCE_TAG = 10_000;
export function taggedPriority(priority: number, sequence: number): number {
  return Math.floor(priority) + (sequence + 1) / SEQUENCE_TAG;
}
export function sequenceOf(item: { evaluationPriority: number }): number {
  return Math.round((item.evaluationPriority % 1) * SEQUENCE_TAG) - 1;
}

/**
 * Every item gets one token first (a decoding sequence needs exactly one), then the
 * rest of the batch is spread over the items that have more (prompts being prefilled),
 * higher evaluation priority first. So a long prompt is prefilled in batch-sized chunks
 * while every running stream still advances one token per step.
 */
export function fairShare(items: readonly BatchItem[], size: number): PrioritizedBatchItem[] {
  const out: PrioritizedBatchItem[] = [];
  let left = size;
  for (const item of items) {
    if (left === 0) break;
    out.push({ item, processAmount: 1 });
    left--;
  }
  if (left > 0 && out.length > 0) {
    const hungry = out.filter((p) => p.item.tokens.length > 1);
    hungry.sort((a, b) => b.item.evaluationPriority - a.item.evaluationPriority);
    for (let i = 0; i < hungry.length && left > 0; i++) {
      const p = hungry[i]!;
      const share = Math.max(1, Math.floor(left / (hungry.length - i)));
      const add = Math.min(p.item.tokens.length - 1, share, left);
      p.processAmount += add;
      left -= add;
    }
  }
  return out;
}
