/**
 * The engine adapter: the only module that imports node-llama-cpp. It loads models,
 * owns their contexts and sequences, renders chat prompts with the model's template,
 * and exposes tokens in and tokens out. It knows nothing of HTTP or of requests.
 */
import { readFileSync } from "node:fs";
import {
  getLlama,
  GgufInsights,
  readGgufFileInfo,
  JinjaTemplateChatWrapper,
  LlamaLogLevel,
  resolveChatWrapper,
  specializedChatWrapperTypeNames,
  TokenBias,
  type BatchItem,
  type ChatHistoryItem,
  type ChatWrapper,
  type Llama,
  type LlamaContext,
  type LlamaContextSequence,
  type LlamaModel,
  type PrioritizedBatchItem,
  type Token,
} from "node-llama-cpp";
import type { GpuChoice } from "../config/cli.js";

export type { Token };

export class ModelLoadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ModelLoadError";
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
  seed: number;
  presencePenalty: number;
  frequencyPenalty: number;
  logitBias: ReadonlyMap<number, number> | undefined;
  /** Keep generating past end-of-generation tokens (benchmarks' fixed output length). */
  ignoreEos: boolean;
}

/** Deterministic decoding with no penalties: warm-ups and tests. */
export const GREEDY_SAMPLING: SamplingParams = Object.freeze({
  temperature: 0,
  topP: 1,
  topK: 40,
  seed: 0,
  presencePenalty: 0,
  frequencyPenalty: 0,
  logitBias: undefined,
  ignoreEos: false,
});

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}

export interface RenderedPrompt {
  tokens: Token[];
  /** Plain-text stop triggers of the chat template (e.g. "\n### Human"); never sent to the client. */
  stopStrings: string[];
}

/** What the scheduler learns about each decode step; the engine notes say this is the only window. */
export interface StepObserver {
  /** Sequences that are running a generation and will ask for a token soon. */
  expectedItems(): number;
  onStep(items: number, tokens: number): void;
}

/**
 * Test-only fault injection (never reachable from the command line): fail the next
 * decode steps as llama.cpp would (the whole batch), slow every step, fail a load.
 */
export interface EngineFaults {
  failNextSteps: number;
  slowStepMs: number;
  failNextLoads: number;
}

export interface LoadOptions {
  id: string;
  path: string;
  ctxSize: number | undefined;
  parallel: number;
  threads: number;
  chatTemplate: string | undefined;
  /** "auto": on for GPU backends, off on CPU (see flashAttentionFor). */
  flashAttention?: "auto" | "on" | "off";
  /** Layers on the GPU: a number or "max"; ignored (0) on the CPU backend. */
  gpuLayers?: number | "max";
  observer: StepObserver;
  faults?: EngineFaults;
}

/** Bytes a loaded model version takes, in RAM and in VRAM. */
export interface MemoryFootprint {
  ram: number;
  vram: number;
}

export type EstimateOptions = Pick<LoadOptions, "id" | "path" | "ctxSize" | "parallel" | "flashAttention" | "gpuLayers">;

export const NODE_LLAMA_CPP_VERSION = "3.21.1";

export class Engine {
  private constructor(readonly llama: Llama) {}

  static async create(gpu: GpuChoice): Promise<Engine> {
    const llama = await getLlama({
      gpu: gpu === "cpu" ? false : gpu,
      // Never download or compile a binary at start: a missing one is an error.
      build: "never",
      // 0: every context uses exactly the threads it asks for, no library-side splitting.
      maxThreads: 0,
      logLevel: LlamaLogLevel.error,
      progressLogs: false,
    });
    return new Engine(llama);
  }

  async vramTotal(): Promise<number> {
    return (await this.llama.getVramState()).total;
  }

  get backend(): string {
    return this.llama.gpu === false ? "cpu" : this.llama.gpu;
  }

  /**
   * Measured here (CPU, stories260K, one thread): llama.cpp's CPU flash-attention path
   * prefilled 6,000 tokens in 32 s against 7.5 s without it, and decoded no faster. So
   * "auto" means on for GPU backends, where it pays, and off on the CPU.
   */
  private flashAttentionFor(choice: "auto" | "on" | "off"): boolean | "auto" {
    if (choice === "on") return true;
    if (choice === "off") return false;
    return this.llama.gpu === false ? false : "auto";
  }

  private gpuLayersFor(choice: number | "max" | undefined, totalLayers: number): number {
    if (this.llama.gpu === false) return 0;
    return choice === undefined || choice === "max" ? totalLayers : Math.min(choice, totalLayers);
  }

  /** The context a load creates: one place, so the estimate and the load cannot differ. */
  private static contextShape(ctxSize: number | undefined, trained: number | undefined, parallel: number) {
    const contextSize = ctxSize ?? Math.min(2048, trained ?? 2048);
    return { contextSize, batchSize: Math.min(512, contextSize * parallel) };
  }

  /**
   * What loading this version would take (weights + KV + compute buffers), from the
   * GGUF header alone, with node-llama-cpp's V2 estimators: the engine notes measured
   * them exact on this build, where V1 was 12x too high.
   */
  async estimate(opts: EstimateOptions): Promise<MemoryFootprint> {
    let insights: GgufInsights;
    try {
      insights = await GgufInsights.from(await readGgufFileInfo(opts.path, { logWarnings: false }), this.llama);
    } catch (err) {
      throw new ModelLoadError(`model "${opts.id}": cannot load ${opts.path}: ${firstLine(err)}`);
    }
    const gpuLayers = this.gpuLayersFor(opts.gpuLayers, insights.totalLayers);
    const { contextSize, batchSize } = Engine.contextShape(opts.ctxSize, insights.trainContextSize, opts.parallel);
    const weights = await insights.estimateModelResourceRequirementsV2({ gpuLayers });
    const context = await insights.estimateContextResourceRequirementsV2({
      contextSize,
      sequences: opts.parallel,
      batchSize,
      modelGpuLayers: gpuLayers,
      flashAttention: this.flashAttentionFor(opts.flashAttention ?? "auto"),
    });
    return { ram: weights.cpuRam + context.cpuRam, vram: weights.gpuVram + context.gpuVram };
  }

  async loadModel(opts: LoadOptions): Promise<EngineModel> {
    let model: LlamaModel;
    if (opts.faults && opts.faults.failNextLoads > 0) {
      opts.faults.failNextLoads--;
      throw new ModelLoadError(`model "${opts.id}": cannot load ${opts.path}: injected load failure`);
    }
    try {
      model = await this.llama.loadModel({ modelPath: opts.path, gpuLayers: this.llama.gpu === false ? 0 : (opts.gpuLayers ?? "max") });
    } catch (err) {
      throw new ModelLoadError(`model "${opts.id}": cannot load ${opts.path}: ${firstLine(err)}`);
    }
    try {
      const { contextSize: ctxSize, batchSize } = Engine.contextShape(opts.ctxSize, model.trainContextSize, opts.parallel);
      const stepGate = new StepGate(opts.observer, opts.faults);
      const context = await model.createContext({
        sequences: opts.parallel,
        contextSize: ctxSize,
        threads: opts.threads,
        batchSize,
        batching: { itemPrioritizationStrategy: stepGate.strategy },
        flashAttention: this.flashAttentionFor(opts.flashAttention ?? "auto"),
      });
      const chatWrapper = resolveTemplate(model, opts.chatTemplate, opts.id);
      return new EngineModel(opts.id, model, context, chatWrapper, ctxSize);
    } catch (err) {
      await model.dispose();
      if (err instanceof ModelLoadError) throw err;
      throw new ModelLoadError(`model "${opts.id}": cannot create a context: ${firstLine(err)}`);
    }
  }

  async dispose(): Promise<void> {
    await this.llama.dispose();
  }
}

function firstLine(err: unknown): string {
  return String((err as Error)?.message ?? err).split("\n")[0]!;
}

function resolveTemplate(model: LlamaModel, template: string | undefined, id: string): ChatWrapper {
  if (template === undefined) return resolveChatWrapper(model);
  if ((specializedChatWrapperTypeNames as readonly string[]).includes(template)) {
    return resolveChatWrapper(model, { type: template as (typeof specializedChatWrapperTypeNames)[number] });
  }
  let text: string;
  try {
    text = readFileSync(template, "utf8");
  } catch {
    throw new ModelLoadError(
      `model "${id}": chat_template "${template}" is neither a built-in (${specializedChatWrapperTypeNames.join(", ")}) nor a readable Jinja file`,
    );
  }
  try {
    return new JinjaTemplateChatWrapper({ template: text });
  } catch (err) {
    throw new ModelLoadError(`model "${id}": chat_template ${template}: ${firstLine(err)}`);
  }
}

/**
 * Makes every decode step carry a token for every running sequence.
 *
 * node-llama-cpp re-forms the next batch as soon as the previous decode returns; a
 * sequence whose consumer is still a few microtasks away from asking for its next
 * token misses that step and joins the one after, so steps alternate half-full. The
 * batch strategy is the only hook inside that loop: while fewer sequences are queued
 * than are running, it returns an empty batch, which makes the loop go round once more
 * after a microtask turn. The wait is bounded by a spin count, so a sequence that is
 * really waiting on I/O delays the others by microseconds, never by a step.
 */
class StepGate {
  private spins = 0;
  static readonly MAX_SPINS = 64;

  constructor(private readonly observer: StepObserver, private readonly faults: EngineFaults | undefined) {}

  readonly strategy = ({ items, size }: { items: readonly BatchItem[]; size: number }): PrioritizedBatchItem[] => {
    if (items.length < this.observer.expectedItems() && this.spins < StepGate.MAX_SPINS) {
      this.spins++;
      return [];
    }
    this.spins = 0;
    // Where a real decode failure would strike: the batch as it is about to be decoded.
    if (this.faults) this.injectFaults(items.length);
    const batch = fairShare(items, size);
    let tokens = 0;
    for (const b of batch) tokens += b.processAmount;
    this.observer.onStep(batch.length, tokens);
    return batch;
  };

  /** A throw here is how llama.cpp's own decode failures reach callers: every queued item of the batch is rejected. */
  private injectFaults(items: number): void {
    const f = this.faults!;
    if (f.slowStepMs > 0) {
      const until = performance.now() + f.slowStepMs;
      while (performance.now() < until) {
        /* a slow step, on purpose */
      }
    }
    if (f.failNextSteps > 0 && items > 0) {
      f.failNextSteps--;
      throw new Error("injected decode failure");
    }
  }
}

/**
 * Every item gets one token first (a decoding sequence needs exactly one), then the
 * rest of the batch is spread over the items that have more (prompts being prefilled),
 * higher evaluation priority first. So a long prompt is prefilled in batch-sized chunks
 * while every running stream still advances one token per step.
 */
function fairShare(items: readonly BatchItem[], size: number): PrioritizedBatchItem[] {
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

export class EngineModel {
  readonly sequences: EngineSequence[];
  readonly vocabularySize: number;
  /** KV cache bytes one token occupies (F16 keys and values over all layers). */
  readonly kvBytesPerToken: number;
  private readonly bos: Token | undefined;

  constructor(
    readonly id: string,
    private readonly model: LlamaModel,
    private readonly context: LlamaContext,
    private readonly chatWrapper: ChatWrapper,
    /** Tokens per sequence. */
    readonly ctxSize: number,
  ) {
    this.sequences = [];
    for (let i = 0; i < context.totalSequences; i++) {
      this.sequences.push(new EngineSequence(i, context.getSequence(), this.model));
    }
    const tokens = model.fileInfo.metadata.tokenizer?.ggml?.tokens;
    this.vocabularySize = tokens?.length ?? 0;
    this.kvBytesPerToken = kvBytesPerToken(model);
    this.bos = model.tokens.shouldPrependBosToken ? (model.tokens.bos ?? undefined) : undefined;
  }

  get parallel(): number {
    return this.sequences.length;
  }

  get templateName(): string {
    return this.chatWrapper.wrapperName;
  }

  get sizeBytes(): number {
    return this.model.size;
  }

  /** What llama.cpp reports it allocated for the weights and the context (its memory breakdown). */
  get memoryUsage(): MemoryFootprint {
    const m = this.model.memoryUsage;
    const c = this.context.memoryUsage;
    return { ram: m.ram + c.ram, vram: m.vram + c.vram };
  }

  /** A completion prompt: BOS (when the model wants one) and the text, special tokens parsed as llama-server does. */
  tokenizePrompt(text: string): Token[] {
    const tokens = this.model.tokenize(text, true);
    if (this.bos !== undefined && tokens[0] !== this.bos) tokens.unshift(this.bos);
    return tokens;
  }

  /** Renders a chat with the model's template. A trailing assistant message is continued, not closed. */
  renderChat(messages: readonly ChatMessage[]): RenderedPrompt {
    const history: ChatHistoryItem[] = [];
    for (const m of messages) {
      if (m.role === "system") history.push({ type: "system", text: m.content });
      else if (m.role === "user") history.push({ type: "user", text: m.content });
      else history.push({ type: "model", response: [m.content] });
    }
    if (history.at(-1)?.type !== "model") history.push({ type: "model", response: [] });
    let state;
    try {
      state = this.chatWrapper.generateContextState({ chatHistory: history });
    } catch (err) {
      throw new PromptRenderError(`the chat template rejected these messages: ${firstLine(err)}`);
    }
    const stopStrings: string[] = [];
    for (const trigger of state.stopGenerationTriggers) {
      if (trigger.values.length > 0 && trigger.values.every((v) => typeof v === "string")) {
        const s = (trigger.values as string[]).join("");
        if (s !== "") stopStrings.push(s);
      }
    }
    return { tokens: state.contextText.tokenize(this.model.tokenizer), stopStrings };
  }

  detokenize(tokens: readonly Token[], lastTokens?: readonly Token[]): string {
    return this.model.detokenize(tokens, false, lastTokens);
  }

  isValidToken(token: number): boolean {
    return Number.isInteger(token) && token >= 0 && token < this.vocabularySize;
  }

  makeTokenBias(bias: ReadonlyMap<number, number>): TokenBias {
    const tb = new TokenBias(this.model.tokenizer);
    for (const [token, value] of bias) tb.set(token as Token, { logit: value });
    return tb;
  }

  async dispose(): Promise<void> {
    await this.context.dispose();
    await this.model.dispose();
  }
}

/**
 * Σ over layers of n_head_kv × (head_dim_k + head_dim_v) × 2 bytes (F16), from the GGUF
 * metadata of the model's architecture (stories260K: 5 × 4 × (8 + 8) × 2 = 640).
 */
function kvBytesPerToken(model: LlamaModel): number {
  const meta = model.fileInfo.metadata as unknown as Record<string, Record<string, unknown>> & { general: { architecture: string } };
  const arch = meta[meta.general.architecture] as
    | { block_count?: number; embedding_length?: number; attention?: { head_count?: number; head_count_kv?: number | number[]; key_length?: number; value_length?: number } }
    | undefined;
  if (!arch?.block_count || !arch.attention?.head_count || !arch.embedding_length) return 0;
  const headDim = arch.embedding_length / arch.attention.head_count;
  const kv = arch.attention.head_count_kv ?? arch.attention.head_count;
  const perLayerKv = Array.isArray(kv) ? kv : new Array<number>(arch.block_count).fill(kv);
  const k = arch.attention.key_length ?? headDim;
  const v = arch.attention.value_length ?? headDim;
  return perLayerKv.reduce((sum, heads) => sum + heads * (k + v) * 2, 0);
}

/** One slot: a sequence of the model's context, created once and reused for every request. */
export class EngineSequence {
  constructor(
    readonly index: number,
    private readonly seq: LlamaContextSequence,
    private readonly model: LlamaModel,
  ) {}

  /** The tokens whose KV this sequence holds. */
  heldTokens(): readonly Token[] {
    return this.seq.contextTokens;
  }

  /**
   * Drops the KV from `from` on. Takes the context lock, so the caller must make sure
   * no sequence is waiting on a decode step (the disposal trap in the engine notes).
   */
  async truncate(from: number): Promise<void> {
    const end = this.seq.nextTokenIndex;
    if (from < end) await this.seq.eraseContextTokenRanges([{ start: from, end }]);
  }

  /** Evaluates tokens without sampling (a prefill chunk). */
  async prefill(tokens: Token[], priority: number): Promise<void> {
    await this.seq.evaluateWithoutGeneratingNewTokens(tokens, { evaluationPriority: priority as 1 | 2 | 3 | 4 | 5 });
  }

  /**
   * Evaluates `tokens` and then yields each generated token; the end-of-generation
   * token ends the iteration without being yielded. Closing the iterator stops at the
   * next step; the KV of what was evaluated stays for prefix reuse.
   */
  generate(tokens: Token[], sampling: SamplingParams, generated: Token[], tokenBias: TokenBias | undefined): AsyncGenerator<Token, void, void> {
    const penalize = sampling.presencePenalty !== 0 || sampling.frequencyPenalty !== 0;
    return this.seq.evaluate(tokens, {
      temperature: sampling.temperature,
      topP: sampling.topP,
      // Greedy needs no candidate list at all; "no top-k" makes llama.cpp sort the whole
      // vocabulary every token (measured: 2 ms/token on a 32k vocabulary), so top-k is
      // on by default, at llama-server's 40.
      topK: sampling.temperature === 0 ? 1 : sampling.topK,
      minP: 0,
      seed: sampling.seed,
      tokenBias,
      yieldEogToken: sampling.ignoreEos,
      repeatPenalty: penalize
        ? {
            // OpenAI's penalties apply to the generated tokens only.
            punishTokens: () => generated,
            maxPunishTokens: 1 << 20,
            penalty: 1,
            presencePenalty: sampling.presencePenalty,
            frequencyPenalty: sampling.frequencyPenalty,
          }
        : undefined,
    }) as AsyncGenerator<Token, void, void>;
  }

  isEog(token: Token): boolean {
    return this.model.isEogToken(token);
  }
}
