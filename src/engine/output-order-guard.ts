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
 * before. Steps whose items carry one token each are left alone.
 */
import type { LlamaContext } from "node-llama-cpp";

interface AddonContext {
  decodeBatch(): Promise<void>;
  sampleToken(...args: unknown[]): Promise<unknown>;
}

/** `mayReorder()` is read as each step is decoded: true when its outputs can come out of order (unknown: true). */
export function guardOutputReorder(context: LlamaContext, mayReorder: () => boolean = () => true): void {
  const ctx = (context as unknown as { _ctx: AddonContext })._ctx;
  const decode = ctx.decodeBatch.bind(ctx);
  const sample = ctx.sampleToken.bind(ctx);
  /** A step was decoded whose first read reorders: the next sample goes alone. */
  let firstPending = false;
  /** That first sample, while it runs: the step's other samples wait for it. */
  let first: Promise<unknown> | undefined;
  // The addon's methods are read-only on its prototype: own properties shadow them.
  Object.defineProperty(ctx, "decodeBatch", {
    configurable: true,
    value: async () => {
      const reorder = mayReorder();
      await decode();
      firstPending = reorder;
      first = undefined;
    },
  });
  Object.defineProperty(ctx, "sampleToken", {
    configurable: true,
    value: (...args: unknown[]) => {
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
