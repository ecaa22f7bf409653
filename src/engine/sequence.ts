import { LlamaGrammarEvaluationState, type LlamaContextSequence, type LlamaGrammar, type LlamaModel, type Token, type TokenBias } from "node-llama-cpp";
import { taggedPriority } from "./batch-strategy.js";
import { plainGreedy, runAheadMarksOf } from "./run-ahead.js";
import type { GenerateOptions, SamplingParams } from "./types.js";

/** One slot: a sequence of the model's context, created once and reused for every request. */
export class EngineSequence {
  constructor(
    readonly index: number,
    private readonly seq: LlamaContextSequence,
    private readonly model: LlamaModel,
    /** Which slot class (context) it belongs to, and that class's tokens per sequence. */
    readonly slotClass = 0,
    readonly ctxSize = Infinity,
    /** Its sequence id within its context (what llama.cpp orders a step by). */
    readonly localIndex = index,
  ) {}

  /** A priority carrying this sequence's id, for the batch strategy (batch-strategy.ts). */
  private priority(p: number): 1 | 2 | 3 | 4 | 5 {
    return taggedPriority(p, this.localIndex) as 1 | 2 | 3 | 4 | 5;
  }

  /** Its token predictor's counts (zeros without one). */
  get predictions(): { validated: number; refuted: number } {
    return this.seq.tokenPredictions;
  }

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
    this.markRunAhead(undefined);
    await this.seq.evaluateWithoutGeneratingNewTokens(tokens, { evaluationPriority: this.priority(priority) });
  }

  /**
   * Evaluates `tokens` and then yields each generated token; the end-of-generation
   * token ends the iteration without being yielded. Closing the iterator stops at the
   * next step; the KV of what was evaluated stays for prefix reuse.
   */
  generate(tokens: Token[], sampling: SamplingParams, generated: Token[], extras: GenerateOptions = {}): AsyncGenerator<Token, void, void> {
    const penalize = sampling.presencePenalty !== 0 || sampling.frequencyPenalty !== 0 || sampling.repeatPenalty !== 1;
    const options = {
      temperature: sampling.temperature,
      topP: sampling.topP,
      // Greedy needs no candidate list at all; "no top-k" makes llama.cpp sort the whole
      // vocabulary every token, so top-k is on by default, at llama-server's 40.
      topK: sampling.temperature === 0 ? 1 : sampling.topK,
      minP: sampling.minP,
      seed: sampling.seed,
      evaluationPriority: this.priority(5),
      tokenBias: extras.tokenBias as TokenBias | (() => TokenBias) | undefined,
      grammarEvaluationState: extras.grammar ? new LlamaGrammarEvaluationState({ model: this.model, grammar: extras.grammar as LlamaGrammar }) : undefined,
      yieldEogToken: sampling.ignoreEos,
      repeatPenalty: penalize
        ? {
            // OpenAI's penalties apply to the generated tokens only; llama.cpp's repeat
            // penalty to its last N (vLLM's repetition_penalty, llama-server's repeat_penalty).
            punishTokens: () => (sampling.repeatPenalty !== 1 ? generated.slice(-sampling.repeatLastN) : generated),
            maxPunishTokens: sampling.repeatPenalty !== 1 ? sampling.repeatLastN : 1 << 20,
            penalty: sampling.repeatPenalty,
            presencePenalty: sampling.presencePenalty,
            frequencyPenalty: sampling.frequencyPenalty,
          }
        : undefined,
    };
    // A token predictor checks several tokens a step: never a lone step of one.
    this.markRunAhead(extras.moreWanted !== undefined && this.seq.tokenPredictor === undefined && plainGreedy(sampling, extras) ? extras.moreWanted : undefined);
    // Prompt lookup searches the whole prompt: the prefix held from before and the new input.
    this.seq.tokenPredictor?.updateInputTokens?.([...this.seq.contextTokens, ...tokens]);
    const probe = extras.probe;
    if (!probe) return this.seq.evaluate(tokens, options) as AsyncGenerator<Token, void, void>;
    return this.probed(tokens, options, probe);
  }

  /** The same, reporting each step's probabilities into the probe (logprobs, best_of). */
  private async *probed(tokens: Token[], options: Parameters<LlamaContextSequence["evaluate"]>[1], probe: NonNullable<GenerateOptions["probe"]>): AsyncGenerator<Token, void, void> {
    const meta = probe.want === "probabilities" ? { probabilities: true as const } : { confidence: true as const };
    const it = this.seq.evaluateWithMetadata(tokens, meta, options);
    try {
      for await (const step of it) {
        const s = step as { token: Token; probabilities?: Map<Token, number>; confidence?: number };
        probe.probabilities = s.probabilities;
        probe.confidence = s.confidence;
        yield s.token;
      }
    } finally {
      await it.return?.(undefined);
    }
  }

  /**
   * The probability distribution of the next token after each of `tokens` (prompt
   * scoring: echo with logprobs). Evaluates them all; `from` of them may already be held.
   */
  async score(tokens: Token[]): Promise<Array<ReadonlyMap<Token, number> | undefined>> {
    this.markRunAhead(undefined);
    const out = await this.seq.controlledEvaluate(
      tokens.map((t) => [t, { generateNext: { probabilities: true, options: { temperature: 0 } } }] as const),
      { evaluationPriority: this.priority(5) },
    );
    return out.map((o) => o?.next?.probabilities);
  }

  /** Whether this sequence's steps may run ahead from now on (run-ahead.ts). */
  private markRunAhead(moreWanted: (() => boolean) | undefined): void {
    runAheadMarksOf(this.seq.context).set(this.localIndex, moreWanted);
  }

  isEog(token: Token): boolean {
    return this.model.isEogToken(token);
  }
}
