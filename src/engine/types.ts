/** The engine's vocabulary: what callers pass in and get back. No node-llama-cpp types leak out but Token. */
import type { Token } from "node-llama-cpp";

export type { Token };

export type GpuBackend = "auto" | "cuda" | "metal" | "vulkan" | "cpu";
/** Which llama.cpp binary: node-llama-cpp's prebuilt one, one built here (npm run engine:build), or the local one when there is one. */
export const ENGINE_BINARIES = ["auto", "prebuilt", "local"] as const;
export type EngineBinary = (typeof ENGINE_BINARIES)[number];

/** KV cache element types, as llama-server's --cache-type-k/-v name them. */
export const KV_CACHE_TYPES = ["f16", "bf16", "f32", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"] as const;
export type KvCacheType = (typeof KV_CACHE_TYPES)[number];

/** Bytes per element of each type (a quantized block's bytes over its 32 elements). */
export const KV_TYPE_BYTES: Record<KvCacheType, number> = { f16: 2, bf16: 2, f32: 4, q8_0: 34 / 32, q4_0: 18 / 32, q4_1: 20 / 32, q5_0: 22 / 32, q5_1: 24 / 32, iq4_nl: 18 / 32 };

/**
 * Speculative decoding by prompt lookup (vLLM's "ngram" method, llama.cpp's lookup): the
 * tokens that followed the last generated ones where they occur in the prompt are
 * evaluated ahead, and kept when the model agrees. Greedy output does not change.
 */
export interface NgramSpeculation {
  method: "ngram";
  /** Tokens predicted ahead at most (vLLM's num_speculative_tokens). */
  tokens: number;
  /** Shortest run of last tokens looked up in the prompt (vLLM's prompt_lookup_min). */
  minPattern: number;
  /** No predictions while more generations than this run on the version (vLLM's disable_by_batch_size); none: always. */
  disableByBatchSize?: number;
}

/**
 * Speculative decoding with a draft model (vLLM's draft_model, llama-server's
 * --model-draft): a smaller model with the target's tokenizer runs ahead of each slot
 * on a sequence of its own, and the target checks its guesses in one step.
 */
export interface DraftSpeculation {
  method: "draft";
  /** Tokens drafted ahead at most (llama-server's --draft-max). */
  tokens: number;
  /** The draft GGUF file. */
  path: string;
  /** Pinned hash of the draft file; checked before it loads. */
  sha256?: string;
  /** The draft stops guessing below this probability for its token (llama-server's --draft-p-min). */
  minConfidence: number;
  /**
   * No drafting while more generations than this run on the version (vLLM's
   * disable_by_batch_size); none: DEFAULT_DRAFT_DISABLE_BY_BATCH_SIZE.
   */
  disableByBatchSize?: number;
}

export type SpeculativeOptions = NgramSpeculation | DraftSpeculation;

/**
 * Tokens a draft guesses ahead by default: 8 gave 1.27× and 4 gave 1.21× on Llama 3.2 1B's
 * shape with a draft that agrees (`npm run bench -- draft`; llama-server's default is 16).
 */
export const DEFAULT_DRAFT_TOKENS = 8;
/** node-llama-cpp's default for its draft predictor's minimum confidence. */
export const DEFAULT_DRAFT_MIN_CONFIDENCE = 0.6;
/**
 * A draft guesses for a lone generation only, by default: with several, each slot waits
 * on its own draft and the steps that batched them fall apart (measured on Llama 3.2 1B's
 * shape, c=4: 0.45–0.59× without the limit; README, Measured).
 */
export const DEFAULT_DRAFT_DISABLE_BY_BATCH_SIZE = 1;

/** What speculation did on a version: predicted tokens the model then confirmed or refuted. */
export interface SpeculationStats {
  accepted: number;
  rejected: number;
}

/** Keys' and values' types in the KV cache. */
export interface KvCacheTypes {
  k: KvCacheType;
  v: KvCacheType;
}

export class ModelLoadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ModelLoadError";
  }
}

/** The requested GPU backend cannot run here; the message names what is missing and what to do. */
export class BackendUnavailableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BackendUnavailableError";
  }
}

/** The prompt cannot be rendered (e.g. a template that rejects the role order). */
export class PromptRenderError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "PromptRenderError";
  }
}

export interface SamplingParams {
  temperature: number;
  topP: number;
  /** 0 = no top-k. */
  topK: number;
  /** 0 = off. */
  minP: number;
  seed: number;
  presencePenalty: number;
  frequencyPenalty: number;
  /** llama.cpp's repeat penalty over the last `repeatLastN` tokens; 1 = off. */
  repeatPenalty: number;
  repeatLastN: number;
  logitBias: ReadonlyMap<number, number> | undefined;
  /** Keep generating past end-of-generation tokens (benchmarks' fixed output length). */
  ignoreEos: boolean;
}

/** Deterministic decoding with no penalties: warm-ups and tests. */
export const GREEDY_SAMPLING: SamplingParams = Object.freeze({
  temperature: 0,
  topP: 1,
  topK: 40,
  minP: 0,
  seed: 0,
  presencePenalty: 0,
  frequencyPenalty: 0,
  repeatPenalty: 1,
  repeatLastN: 64,
  logitBias: undefined,
  ignoreEos: false,
});

/**
 * What a step reports besides its token, when asked: the distribution it was sampled
 * from (logprobs), or just the chosen token's probability (best_of). The sequence
 * writes into one object per generation, so nothing is allocated per token unless asked.
 */
export interface StepProbe {
  probabilities: ReadonlyMap<Token, number> | undefined;
  confidence: number | undefined;
}

export interface GenerateOptions {
  /** A compiled grammar (EngineModel.grammar) the output must follow. */
  grammar?: unknown;
  /** A TokenBias, or a function giving the bias for the next token (min_tokens). */
  tokenBias?: unknown;
  /** Filled per step: probabilities (logprobs) or the chosen token's probability (best_of). */
  probe?: StepProbe & { want: "probabilities" | "confidence" };
  /**
   * Read as each step is formed: whether the loop will ask for the step after it. Where
   * it says so and the sampling is plain greedy, a local build may run that step ahead
   * (run-ahead.ts).
   */
  moreWanted?: () => boolean;
}

/** What the batch strategy learns and asks about each decode step; the engine notes say this is the only window. */
export interface StepObserver {
  /** Sequences of this slot class's context that are running a generation and will ask for a token soon. */
  expectedItems(slotClass: number): number;
  /** Loops of this class not yet steady: before their first token, or paused before a step (where unknown, counted as some). */
  unsettledLoops?(slotClass: number): number;
  onStep(slotClass: number, items: number, tokens: number): void;
}

/**
 * Test-only fault injection (never reachable from the command line): fail the next
 * decode steps as llama.cpp would (the whole batch), slow every step, fail a load.
 */
export interface EngineFaults {
  failNextSteps: number;
  /** Each step's results come this much later, the JavaScript thread free meanwhile (step-calls.ts). */
  slowStepMs: number;
  failNextLoads: number;
}

/** Slots of one context size: `count` sequences of `ctxSize` tokens each (undefined: the model's default). */
export interface SlotClass {
  count: number;
  ctxSize: number | undefined;
}

export interface LoadOptions {
  id: string;
  path: string;
  /** One class of slots (the --parallel/--ctx-size shorthand), unless `slots` is given. */
  ctxSize: number | undefined;
  parallel: number;
  /** Slot classes: one context per class, smallest first. */
  slots?: SlotClass[];
  threads: number;
  chatTemplate: string | undefined;
  /** "auto": on for GPU backends, off on CPU. */
  flashAttention?: "auto" | "on" | "off";
  /** Layers on the GPU: a number or "max"; ignored (0) on the CPU backend. */
  gpuLayers?: number | "max";
  /** Also make an embedding context (its own KV, counted in the estimate). */
  embeddings?: boolean;
  /** Element types of the KV cache; f16 both when absent. */
  kvCacheTypes?: KvCacheTypes;
  /** false: read the weights into memory instead of mapping the file; mapped when absent. */
  mmap?: boolean;
  speculative?: SpeculativeOptions;
  observer: StepObserver;
  faults?: EngineFaults;
  /** Told what an operator should know about the load (a guessed chat template). */
  warn?: (message: string) => void;
}

/** Bytes a loaded model version takes, in RAM and in VRAM. */
export interface MemoryFootprint {
  ram: number;
  vram: number;
}

export type EstimateOptions = Pick<LoadOptions, "id" | "path" | "ctxSize" | "parallel" | "slots" | "flashAttention" | "gpuLayers" | "embeddings" | "kvCacheTypes" | "speculative">;

/** The slot classes a load makes, smallest first. */
export function slotClassesOf(opts: Pick<LoadOptions, "ctxSize" | "parallel" | "slots">): SlotClass[] {
  return opts.slots && opts.slots.length > 0 ? [...opts.slots] : [{ count: opts.parallel, ctxSize: opts.ctxSize }];
}

export const NODE_LLAMA_CPP_VERSION = "3.21.1";

export function firstLine(err: unknown): string {
  return String((err as Error)?.message ?? err).split("\n")[0]!;
}
