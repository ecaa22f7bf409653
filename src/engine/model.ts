import { TokenBias, type ChatHistoryItem, type ChatWrapper, type LlamaContext, type LlamaModel, type Token } from "node-llama-cpp";
import { EngineSequence } from "./sequence.js";
import { firstLine, PromptRenderError, type ChatMessage, type MemoryFootprint, type RenderedPrompt } from "./types.js";

/** A loaded model version: its weights, its one context (whose sequences are the slots), its template. */
export class EngineModel {
  readonly sequences: EngineSequence[];
  readonly vocabularySize: number;
  /** KV cache bytes one token occupies (F16 keys and values over all layers). */
  readonly kvBytesPerToken: number;
  /**
   * The most characters one token stands for (its vocabulary string's length, which is
   * never shorter than its text): a text of n characters has at least n / this tokens,
   * so an oversized prompt is refused before it is tokenized.
   */
  readonly maxTokenChars: number;
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
    let longest = 1;
    for (const t of tokens ?? []) if (t.length > longest) longest = t.length;
    this.maxTokenChars = longest;
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
