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
 * Better still, such a step runs beside the JavaScript thread rather than on it: the
 * token's socket write (50-100 µs of kernel time on loopback) and the rest of its frame
 * then overlap the next step, as llama-server's HTTP threads overlap its loop. Doing that
 * with steps in libuv jobs saved nothing net when tried (a pool thread wakes for each step,
 * and the result waits for the event loop to wake). So the mended addon keeps one "steady"
 * thread for such steps: it spins briefly between steps, so the next is taken at once, and
 * the JavaScript thread takes each result after one turn of its event loop and samples it
 * itself. Through the server
 * at c=1, alternating with `--step-thread js`, its median E2E was lower in every run (1-5%
 * on W2, 8% on W1) and its TTFT ~10% lower on W2 (README, "Engine builds").
 *
 * For a greedy request the steady thread also samples the step and decodes the next one
 * at once, before the JavaScript thread asks for it (run-ahead.ts): the JavaScript
 * thread's work per token then leaves the loop of steps altogether, as llama-server's
 * HTTP work leaves its loop.
 *
 * Only a local build can: `scripts/patch-node-llama-cpp.mjs` adds `decodeBatchNow` and
 * `sampleTokenNow` (the same jobs, run on the calling thread) and `decodeBatchBegin` /
 * `decodeBatchEnd` (the steady thread) to the addon's source, which `npm run engine:build`
 * compiles. The prebuilt binaries run every step in jobs.
 */
import type { Llama } from "node-llama-cpp";

export const STEP_THREADS = ["auto", "steady", "js", "pool"] as const;
export type StepThread = (typeof STEP_THREADS)[number];

/** Where the steps of one sequence run: the steady thread, the JavaScript thread, or libuv jobs (as every other step). */
export type LoneStepPlace = "steady-thread" | "js-thread" | "jobs";

/** How the log's `engine:` line says each. */
export const LONE_STEPS_SAID: Record<LoneStepPlace, string> = {
  "steady-thread": "steps of one sequence on a steady thread beside the JavaScript thread",
  "js-thread": "steps of one sequence on the JavaScript thread",
  jobs: "every step in libuv jobs",
};

/** The most tokens a step run on the JavaScript thread may carry: a decode or a speculative check, never a prompt chunk. */
export const JS_STEP_MAX_TOKENS = 16;

type AddonMethods = Partial<Record<"decodeBatchNow" | "sampleTokenNow" | "decodeBatchBegin" | "decodeBatchEnd", unknown>>;

function addonMethods(llama: Llama): AddonMethods | undefined {
  return (llama as unknown as { _bindings?: { AddonContext?: { prototype?: AddonMethods } } })._bindings?.AddonContext?.prototype;
}

/** Whether the loaded addon can run steps on the calling thread (a local build of the mended source). */
export function canStepOnJsThread(llama: Llama): boolean {
  const proto = addonMethods(llama);
  return typeof proto?.decodeBatchNow === "function" && typeof proto.sampleTokenNow === "function";
}

/** Whether it also has the steady thread. */
export function canStepOnSteadyThread(llama: Llama): boolean {
  const proto = addonMethods(llama);
  return canStepOnJsThread(llama) && typeof proto?.decodeBatchBegin === "function" && typeof proto.decodeBatchEnd === "function";
}

/**
 * Where a lone sequence's steps run with `--step-thread`: `auto` and `steady` the steady
 * thread where the addon has one (else the JavaScript thread where it can), `js` the
 * JavaScript thread, `pool` libuv jobs; jobs wherever the addon cannot.
 */
export function loneStepPlace(llama: Llama, stepThread: StepThread): LoneStepPlace {
  if (stepThread === "pool" || !canStepOnJsThread(llama)) return "jobs";
  return (stepThread === "auto" || stepThread === "steady") && canStepOnSteadyThread(llama) ? "steady-thread" : "js-thread";
}

/** Whether greedy steps run ahead on the steady thread (run-ahead.ts): `auto` only, where lone steps run there. */
export function stepsRunAhead(stepThread: StepThread, place: LoneStepPlace): boolean {
  return stepThread === "auto" && place === "steady-thread";
}

/** Whether a step of `sequences` sequences and `tokens` tokens runs on the JavaScript thread. */
export function stepsOnJsThread(sequences: number, tokens: number): boolean {
  return sequences === 1 && tokens <= JS_STEP_MAX_TOKENS;
}
