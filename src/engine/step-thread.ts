/**
 * Which thread runs a decode step and its samples: a libuv job (node-llama-cpp's way) or
 * the JavaScript thread itself.
 *
 * node-llama-cpp's addon runs every decode step in a libuv job, then every sample in a
 * job of its own: the JavaScript thread hands each job to the pool and sleeps until it is
 * handed the result, four thread hand-offs per token. llama-server runs its loop on one
 * thread. With one sequence nothing runs beside the step anyway, so the hand-offs are pure
 * delay: through the server, W2 at c=1 gave 1.16× the output tok/s with such steps on the
 * JavaScript thread (`npm run bench -- w2`; node-llama-cpp alone: `npm run bench -- micro
 * step-thread`, README "Engine builds").
 *
 * So a step of one sequence and a few tokens (a decode, or a speculative check) runs on
 * the JavaScript thread, blocking it for one step as llama-server's loop is blocked.
 * Steps of several sequences, and prompt chunks (which can take seconds), stay in jobs,
 * where the JavaScript thread streams the other sequences' tokens meanwhile.
 *
 * Only a local build can: `scripts/patch-node-llama-cpp.mjs` adds `decodeBatchNow` and
 * `sampleTokenNow` (the same jobs, run on the calling thread) to the addon's source, which
 * `npm run engine:build` compiles. The prebuilt binaries run every step in jobs.
 */
import type { Llama } from "node-llama-cpp";

export const STEP_THREADS = ["auto", "pool"] as const;
export type StepThread = (typeof STEP_THREADS)[number];

/** The most tokens a step run on the JavaScript thread may carry: a decode or a speculative check, never a prompt chunk. */
export const JS_STEP_MAX_TOKENS = 16;

/** Whether the loaded addon can run steps on the calling thread (a local build of the mended source). */
export function canStepOnJsThread(llama: Llama): boolean {
  const proto = (llama as unknown as { _bindings?: { AddonContext?: { prototype?: { decodeBatchNow?: unknown; sampleTokenNow?: unknown } } } })._bindings?.AddonContext?.prototype;
  return typeof proto?.decodeBatchNow === "function" && typeof proto.sampleTokenNow === "function";
}

/** Whether a step of `sequences` sequences and `tokens` tokens runs on the JavaScript thread. */
export function stepsOnJsThread(sequences: number, tokens: number): boolean {
  return sequences === 1 && tokens <= JS_STEP_MAX_TOKENS;
}
