import { LlamaGrammar, TokenBias, type Llama, type LlamaContext, type LlamaEmbeddingContext, type LlamaModel, type Token, type TokenPredictor } from "node-llama-cpp";
import type { TemplateCapabilities } from "./chat-template.js";
import type { ChatRenderInput, PromptRenderer, RenderedChat } from "./prompt-renderer.js";
import type { DraftModel } from "./draft.js";
import { EngineSequence } from "./sequence.js";
import { firstLine, KV_TYPE_BYTES, type KvCacheTypes, type MemoryFootprint, type SpeculationStats, type SpeculativeOptions } from "./types.js";

/** One token as logprobs show it: its text and its raw bytes (a byte token is one byte of a character). */
export interface TokenText {
  text: string;
  bytes: number[];
}

/** Compiled grammars by GBNF text: the same schema in many requests is compiled once. */
const GRAMMAR_CACHE_SIZE = 64;

/** One context of a version: its sequences are the slots of one class, each `ctxSize` tokens. */
export interface SlotContext {
  context: LlamaContext;
  ctxSize: number;
}

/** A loaded model version: its weights, its contexts (one per slot class; their sequences are the slots), its template. */
export class EngineModel {
  readonly sequences: EngineSequence[];
  readonly vocabularySize: number;
  /** KV cache bytes one token occupies (keys and values over all layers, in their cache types). */
  readonly kvBytesPerToken: number;
  /**
   * The most characters one token stands for (its vocabulary string's length, which is
   * never shorter than its text): a text of n characters has at least n / this tokens,
   * so an oversized prompt is refused before it is tokenized.
   */
  readonly maxTokenChars: number;
  private readonly bos: Token | undefined;
  private readonly grammars = new Map<string, LlamaGrammar>();
  private readonly vocab: readonly string[];
  private renderer!: PromptRenderer;

  constructor(
    readonly id: string,
    private readonly llama: Llama,
    private readonly model: LlamaModel,
    /** Smallest class first. */
    private readonly contexts: readonly SlotContext[],
    private readonly embedding: LlamaEmbeddingContext | undefined = undefined,
    /** The KV cache's element types. */
    readonly kvCacheTypes: KvCacheTypes = { k: "f16", v: "f16" },
    readonly speculative: SpeculativeOptions | undefined = undefined,
    /** The draft model, when `speculative` is a draft (it mirrors these contexts). */
    private readonly draft: DraftModel | undefined = undefined,
    /** Each slot's token predictor, when the version speculates (speculation.ts). */
    predictorFor: ((slotClass: number) => TokenPredictor) | undefined = undefined,
  ) {
    this.sequences = [];
    contexts.forEach(({ context, ctxSize }, slotClass) => {
      for (let i = 0; i < context.totalSequences; i++) {
        const tokenPredictor = predictorFor?.(slotClass);
        this.sequences.push(new EngineSequence(this.sequences.length, context.getSequence({ tokenPredictor }), this.model, slotClass, ctxSize, i));
      }
    });
    const tokens = model.fileInfo.metadata.tokenizer?.ggml?.tokens;
    this.vocab = tokens ?? [];
    this.vocabularySize = tokens?.length ?? 0;
    let longest = 1;
    for (const t of tokens ?? []) if (t.length > longest) longest = t.length;
    this.maxTokenChars = longest;
    this.kvBytesPerToken = kvBytesPerToken(model, kvCacheTypes);
    this.bos = model.tokens.shouldPrependBosToken ? (model.tokens.bos ?? undefined) : undefined;
  }

  get parallel(): number {
    return this.sequences.length;
  }

  /** Tokens per sequence of the largest class: the longest request this version takes. */
  get ctxSize(): number {
    return this.contexts[this.contexts.length - 1]!.ctxSize;
  }

  /** The slot classes, smallest first. */
  get slotClasses(): Array<{ count: number; ctxSize: number }> {
    return this.contexts.map((c) => ({ count: c.context.totalSequences, ctxSize: c.ctxSize }));
  }

  /** Predicted tokens confirmed and refuted, over every sequence since the load. */
  get speculation(): SpeculationStats | undefined {
    if (!this.speculative) return undefined;
    const out = { accepted: 0, rejected: 0 };
    for (const s of this.sequences) {
      const p = s.predictions;
      out.accepted += p.validated;
      out.rejected += p.refuted;
    }
    return out;
  }

  /** KV cells over every class: what the KV cache holds at most. */
  get kvCells(): number {
    let n = 0;
    for (const c of this.contexts) n += c.context.totalSequences * c.ctxSize;
    return n;
  }

  /** Binds the chat renderer, which needs the model's tokenizer (made with the model). */
  useRenderer(renderer: PromptRenderer): void {
    this.renderer = renderer;
  }

  /** Where the chat template came from: "gguf", a file name, or a built-in wrapper's name. */
  get templateName(): string {
    return this.renderer.name;
  }

  get templateCapabilities(): TemplateCapabilities {
    return this.renderer.capabilities;
  }

  /** Weights in memory: the model's and its draft's. */
  get sizeBytes(): number {
    return this.model.size + (this.draft?.sizeBytes ?? 0);
  }

  /** What llama.cpp reports it allocated for the weights and the context (its memory breakdown). */
  get memoryUsage(): MemoryFootprint {
    const m = this.model.memoryUsage;
    const out = { ram: m.ram, vram: m.vram };
    for (const { context } of this.contexts) {
      const c = context.memoryUsage;
      out.ram += c.ram;
      out.vram += c.vram;
    }
    if (this.draft) {
      const d = this.draft.memoryUsage;
      out.ram += d.ram;
      out.vram += d.vram;
    }
    return out;
  }

  /** A completion prompt: BOS (when the model wants one) and the text, special tokens parsed as llama-server does. */
  tokenizePrompt(text: string): Token[] {
    const tokens = this.model.tokenize(text, true);
    if (this.bos !== undefined && tokens[0] !== this.bos) tokens.unshift(this.bos);
    return tokens;
  }

  /** Text as tokens, special tokens parsed, no BOS added (/tokenize without add_special). */
  tokenizeText(text: string): Token[] {
    return this.model.tokenize(text, true);
  }

  /** Renders a chat with the model's template. A trailing assistant message is continued, not closed. */
  renderChat(input: ChatRenderInput): RenderedChat {
    return this.renderer.render(input);
  }

  detokenize(tokens: readonly Token[], lastTokens?: readonly Token[]): string {
    return this.model.detokenize(tokens, false, lastTokens);
  }

  /** Text of the tokens with special tokens written out (/detokenize). */
  detokenizeSpecial(tokens: readonly Token[]): string {
    return this.model.detokenize(tokens, true);
  }

  /**
   * One token's text and raw bytes. Decoded after `before` (or after a neutral token when
   * there is none), so a word-initial token keeps its leading space, as its piece has it.
   */
  tokenText(token: Token, before?: readonly Token[]): TokenText {
    const context = before && before.length > 0 ? before : this.neutral;
    const piece = this.vocab[token];
    let text = this.model.detokenize([token], false, context);
    // SentencePiece marks a word-initial token with "▁": its text starts with a space.
    if (piece?.startsWith("\u2581") && !text.startsWith(" ")) text = ` ${text}`;
    const byte = piece !== undefined ? /^<0x([0-9A-Fa-f]{2})>$/.exec(piece) : null;
    return { text, bytes: byte ? [parseInt(byte[1]!, 16)] : [...Buffer.from(text, "utf8")] };
  }

  /** A token to decode after when nothing precedes: BOS, or the first of the vocabulary. */
  private get neutral(): readonly Token[] {
    return [this.bos ?? (0 as Token)];
  }

  isEog(token: Token): boolean {
    return this.model.isEogToken(token);
  }

  /** Every end-of-generation token of the vocabulary (min_tokens bans them for a while). */
  get eogTokens(): readonly Token[] {
    const out: Token[] = [];
    for (const t of [this.model.tokens.eos, this.model.tokens.eot]) if (t !== null && !out.includes(t)) out.push(t);
    return out;
  }

  /**
   * The compiled grammar for a GBNF text; refuses one llama.cpp cannot parse. Cached,
   * since the same schema comes with many requests.
   */
  grammar(gbnf: string): LlamaGrammar {
    let g = this.grammars.get(gbnf);
    if (g) {
      this.grammars.delete(gbnf);
      this.grammars.set(gbnf, g);
      return g;
    }
    try {
      g = new LlamaGrammar(this.llama, { grammar: gbnf });
    } catch (err) {
      throw new Error(`the grammar does not parse: ${firstLine(err)}`);
    }
    this.grammars.set(gbnf, g);
    if (this.grammars.size > GRAMMAR_CACHE_SIZE) this.grammars.delete(this.grammars.keys().next().value!);
    return g;
  }

  isValidToken(token: number): boolean {
    return Number.isInteger(token) && token >= 0 && token < this.vocabularySize;
  }

  makeTokenBias(bias: ReadonlyMap<number, number>): TokenBias {
    const tb = new TokenBias(this.model.tokenizer);
    for (const [token, value] of bias) tb.set(token as Token, value === -Infinity ? "never" : { logit: value });
    return tb;
  }

  /** Whether this version serves embeddings (the models file's `embeddings: true`). */
  get embeds(): boolean {
    return this.embedding !== undefined;
  }

  /** Size of the embedding vectors: the model's hidden size. */
  get embeddingSize(): number {
    return this.model.embeddingVectorSize;
  }

  /** The embedding context takes one input at a time: calls queue behind each other. */
  private embedQueue: Promise<unknown> = Promise.resolve();

  /**
   * The embedding of each input, pooled as the GGUF declares, L2-normalised (as OpenAI's
   * are). Inputs run one after another on the embedding context; `signal` stops between them.
   */
  embed(inputs: readonly Token[][], signal: AbortSignal): Promise<number[][]> {
    const ctx = this.embedding;
    if (!ctx) return Promise.reject(new Error(`model "${this.id}" does not serve embeddings`));
    const run = this.embedQueue.then(async () => {
      const out: number[][] = [];
      for (const tokens of inputs) {
        signal.throwIfAborted();
        const v = (await ctx.getEmbeddingFor(tokens)).vector;
        let norm = 0;
        for (const x of v) norm += x * x;
        norm = Math.sqrt(norm) || 1;
        out.push(Array.from(v, (x) => x / norm));
      }
      return out;
    });
    this.embedQueue = run.catch(() => {});
    return run;
  }

  async dispose(): Promise<void> {
    await this.embedding?.dispose();
    for (const { context } of this.contexts) await context.dispose();
    await this.draft?.dispose();
    await this.model.dispose();
  }
}

/**
 * Σ over layers of n_head_kv × (head_dim_k + head_dim_v) × 2 bytes (F16), from the GGUF
 * metadata of the model's architecture (stories260K: 5 × 4 × (8 + 8) × 2 = 640).
 */
function kvBytesPerToken(model: LlamaModel, types: KvCacheTypes): number {
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
  return perLayerKv.reduce((sum, heads) => sum + heads * (k * KV_TYPE_BYTES[types.k] + v * KV_TYPE_BYTES[types.v]), 0);
}
