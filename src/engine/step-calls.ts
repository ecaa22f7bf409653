/**
 * Where a context's decode steps and samples run, and the order its samples read the
 * step's outputs in. It wraps the context's two addon calls (`decodeBatch`, `sampleToken`).
 *
 * Which thread (the policy is step-thread.ts's): node-llama-cpp runs each step and each
 * sample in a libuv job. A local build's mended addon (scripts/patch-node-llama-cpp.mjs)
 * can run both on the calling thread instead: a step marked for it decodes and samples
 * there, and every other step and its samples run in jobs. Or, where the steady thread is
 * asked for, a marked step is handed to the addon's steady thread (`decodeBatchBegin`),
 * the calling thread goes on with its microtasks (the token loops write the last token's
 * frames meanwhile) and one turn of the event loop, then takes the result
 * (`decodeBatchEnd`) and samples here. Where the steady thread is busy with another
 * context's step, the step runs here.
 *
 * The order: llama.cpp puts a step's outputs back into batch order lazily: the first read
 * of any logits after the step swaps rows and clears its list of swaps
 * (`llama_context::output_reorder`, which is not thread-safe). Samples in jobs run side by
 * side, so two of those first reads could swap rows twice or halfway: a token sampled from
 * another sequence's logits. The outputs come out of order when llama.cpp splits a step
 * into several ubatches, which it does when the step's items carry different token counts
 * (a prompt chunk beside decoding sequences, a speculative check of several tokens beside
 * others). Seen here as a draft's slot and a stopped generation's last step sharing one
 * step: each got the other's tokens. So after such a step the first sample runs alone,
 * and the others start once it is done. Steps whose items carry one token each are left
 * alone, and a step run on the calling thread samples one after another: nothing to guard.
 */
import type { LlamaContext } from "node-llama-cpp";

interface AddonContext {
  decodeBatch(): Promise<void>;
  sampleToken(...args: unknown[]): Promise<unknown>;
  /** The same jobs run on the calling thread, returned settled (a local build's mended addon only). */
  decodeBatchNow?(): Promise<void>;
  sampleTokenNow?(...args: unknown[]): Promise<unknown>;
  /**
   * Hands the step to the steady thread: 1, or 0 where it is busy (a local build's mended
   * addon only). With `runAhead`, it also samples the step greedily and decodes the next
   * one meanwhile; 2: the step is that one, run ahead already (or running).
   */
  decodeBatchBegin?(runAhead?: boolean): number;
  /** Waits for the step handed over, and returns its settled result. */
  decodeBatchEnd?(): Promise<void>;
}

const turnOfTheLoop = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** Steps decoded and samples taken so far, by where they ran (tests and benchmarks read them; a sum per step or token, nothing more). */
export const stepsTaken = { jsThread: 0, steadyThread: 0, ranAhead: 0, jobs: 0 };
export const samplesTaken = { jsThread: 0, jobs: 0 };

export interface StepRoutes {
  /** Read as each step is decoded: its outputs can come out of order. Unknown: true. */
  mayReorder?: () => boolean;
  /** Read at the same time: the step is decoded and sampled on the calling thread (where the addon has `decodeBatchNow`). */
  stepHere?: () => boolean;
  /** A step marked so is decoded on the addon's steady thread (where it has one), and sampled here. */
  steadyThread?: boolean;
  /** Read as a step is handed to the steady thread: it may run the next step ahead (run-ahead.ts). */
  runAhead?: () => boolean;
  /**
   * Tests' fault hook (EngineFaults.slowStepMs): each step's results come this much later,
   * with this thread free meanwhile, as a long step's in a job do. Requests arriving during
   * it are received then and join the next step.
   */
  slowStepMs?: () => number;
}

export function routeStepCalls(context: LlamaContext, { mayReorder = () => true, stepHere = () => false, steadyThread = false, runAhead = () => false, slowStepMs }: StepRoutes): void {
  const ctx = (context as unknown as { _ctx: AddonContext })._ctx;
  const decode = ctx.decodeBatch.bind(ctx);
  const sample = ctx.sampleToken.bind(ctx);
  const decodeNow = ctx.decodeBatchNow?.bind(ctx);
  const sampleNow = ctx.sampleTokenNow?.bind(ctx);
  const canRunHere = decodeNow !== undefined && sampleNow !== undefined;
  const begin = steadyThread ? ctx.decodeBatchBegin?.bind(ctx) : undefined;
  const end = ctx.decodeBatchEnd?.bind(ctx);
  /** The step's result, taken after one turn of the event loop (the same turn as below). */
  const endAfterATurn = (): Promise<void> => turnOfTheLoop().then(end);
  /** A step was decoded whose first read reorders: the next sample goes alone. */
  let firstPending = false;
  /** That first sample, while it runs: the step's other samples wait for it. */
  let first: Promise<unknown> | undefined;
  /** The step just decoded ran on this thread: so do its samples. */
  let here = false;
  const decodeStep = (): Promise<void> => {
    const lone = canRunHere && stepHere();
    // A step of several sequences goes to the steady thread only to run ahead, and to jobs
    // where that thread is busy.
    const ahead = begin !== undefined && canRunHere && runAhead();
    // A build from before steps ran ahead answers true or false.
    const begun = (lone || ahead) && begin !== undefined ? Number(begin(ahead)) : 0;
    if (begun !== 0) {
      here = true;
      stepsTaken.steadyThread++;
      if (begun === 2) stepsTaken.ranAhead++;
      return endAfterATurn();
    }
    if (lone) {
      here = true;
      stepsTaken.jsThread++;
      // Then one turn of the event loop (I/O, timers, other requests) before the step
      // counts as done: steps that settle at once would otherwise chain a whole
      // generation into one macrotask, and requests that arrived during the step would
      // miss the next batch, which is formed as soon as this one's samples are in.
      return decodeNow!().then(turnOfTheLoop);
    }
    here = false;
    stepsTaken.jobs++;
    const reorder = mayReorder();
    return decode().then(() => {
      firstPending = reorder;
      first = undefined;
    });
  };
  // The addon's methods are read-only on its prototype: own properties shadow them.
  Object.defineProperty(ctx, "decodeBatch", {
    configurable: true,
    value:
      slowStepMs === undefined
        ? decodeStep
        : (): Promise<void> => {
            const ms = slowStepMs();
            return ms > 0 ? decodeStep().then(() => new Promise((resolve) => setTimeout(resolve, ms))) : decodeStep();
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
