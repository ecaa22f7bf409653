/**
 * Keeps two sequences' samples from reading each other's logits.
 *
 * llama.cpp puts a step's outputs back into batch order lazily: the first read of any
 * logits after the step swaps rows and clears its list of swaps
 * (`llama_context::output_reorder`, which is not thread-safe). node-llama-cpp samples each
 * sequence's token in a libuv job of its own, so two of those first reads can run at once
 * and swap rows twice or halfway: a token is sampled from another sequence's logits. The
 * outputs come out of order when llama.cpp splits a step into several ubatches, which it
 * does when the step's items carry different token counts (a prompt chunk beside decoding
 * sequences, a speculative check of several tokens beside others). Seen here as a draft's
 * slot and a stopped generation's last step sharing one step: each got the other's tokens.
 *
 * The guard wraps the context's addon calls: after such a step, the first sample runs
 * alone (it does the reordering), and the others start once it is done, in parallel as
 * before. Steps whose items carry one token each are left alone. A step run on the
 * JavaScript thread (step-thread.ts) samples one after another: nothing to guard.
 */
import type { LlamaContext } from "node-llama-cpp";

interface AddonContext {
  decodeBatch(): Promise<void>;
  sampleToken(...args: unknown[]): Promise<unknown>;
  /** The same jobs run on the calling thread, returned settled (a local build's mended addon only). */
  decodeBatchNow?(): Promise<void>;
  sampleTokenNow?(...args: unknown[]): Promise<unknown>;
}

const turnOfTheLoop = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** Samples taken so far, by where they ran (tests and benchmarks read it; a sum per token, nothing more). */
export const samplesTaken = { jsThread: 0, jobs: 0 };

/**
 * `mayReorder()` is read as each step is decoded: true when its outputs can come out of
 * order (unknown: true). `onJsThread()`, read at the same time: that step is decoded and
 * sampled on the calling thread (the addon must have `decodeBatchNow`; see step-thread.ts),
 * its samples one after another, so they need no guard.
 */
export function guardOutputReorder(context: LlamaContext, mayReorder: () => boolean = () => true, onJsThread: () => boolean = () => false): void {
  const ctx = (context as unknown as { _ctx: AddonContext })._ctx;
  const decode = ctx.decodeBatch.bind(ctx);
  const sample = ctx.sampleToken.bind(ctx);
  const decodeNow = ctx.decodeBatchNow?.bind(ctx);
  const sampleNow = ctx.sampleTokenNow?.bind(ctx);
  const canRunHere = decodeNow !== undefined && sampleNow !== undefined;
  /** A step was decoded whose first read reorders: the next sample goes alone. */
  let firstPending = false;
  /** That first sample, while it runs: the step's other samples wait for it. */
  let first: Promise<unknown> | undefined;
  /** The step just decoded ran on this thread: so do its samples. */
  let here = false;
  // The addon's methods are read-only on its prototype: own properties shadow them.
  Object.defineProperty(ctx, "decodeBatch", {
    configurable: true,
    value: (): Promise<void> => {
      if (canRunHere && onJsThread()) {
        here = true;
        // Then one turn of the event loop (I/O, timers, other requests) before the step
        // counts as done: steps that settle at once would otherwise chain a whole
        // generation into one macrotask, and requests that arrived during the step would
        // miss the next batch, which is formed as soon as this one's samples are in.
        return decodeNow!().then(turnOfTheLoop);
      }
      here = false;
      const reorder = mayReorder();
      return decode().then(() => {
        firstPending = reorder;
        first = undefined;
      });
    },
  });
  Object.defineProperty(ctx, "sampleToken", {
    configurable: true,
    value: (...args: unknown[]) => {
      if (here) {
        samplesTaken.jsThread++;
        return sampleNow!(...args);
      }
      samplesTaken.jobs++;
      if (firstPending) {
        firstPending = false;
        const p = sample(...args);
        first = p.catch(() => undefined);
        return p;
      }
      return first !== undefined ? first.then(() => sample(...args)) : sample(...args);
    },
  });
}
