import type { LlamaContextSequence, LlamaModel, Token, TokenBias } from "node-llama-cpp";
import type { SamplingParams } from "./types.js";

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
  generate(tokens: Token[], sampling: SamplingParams, generated: Token[], tokenBias: unknown): AsyncGenerator<Token, void, void> {
    const penalize = sampling.presencePenalty !== 0 || sampling.frequencyPenalty !== 0;
    return this.seq.evaluate(tokens, {
      temperature: sampling.temperature,
      topP: sampling.topP,
      // Greedy needs no candidate list at all; "no top-k" makes llama.cpp sort the whole
      // vocabulary every token, so top-k is on by default, at llama-server's 40.
      topK: sampling.temperature === 0 ? 1 : sampling.topK,
      minP: 0,
      seed: sampling.seed,
      tokenBias: tokenBias as TokenBias | undefined,
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
