/**
 * The draft model of a version that speculates with one (vLLM's draft_model, llama-server's
 * --model-draft): its weights, one context per slot class of the target (as many
 * sequences, as long), and for each target slot a predictor on the draft sequence that
 * mirrors it. Loaded, counted in the version's memory and disposed with the version.
 */
import { TokenPredictor, type Llama, type LlamaContext, type LlamaContextSequence, type LlamaModel, type SequenceEvaluateOptions, type Token } from "node-llama-cpp";
import { sequenceOrdered, tokensIn } from "./batch-strategy.js";
import { routeStepCalls } from "./step-calls.js";
import { stepsOnJsThread, type LoneStepPlace } from "./step-thread.js";
import { firstLine, ModelLoadError, type DraftSpeculation, type MemoryFootprint } from "./types.js";

/** A context the draft mirrors: the target class's sequences, tokens per sequence and batch size. */
export interface DraftContextShape {
  sequences: number;
  contextSize: number;
  batchSize: number;
}

export interface DraftLoadOptions {
  /** The target version's id, for messages. */
  id: string;
  threads: number;
  gpuLayers: number | "max";
  /** false: the draft's weights are read into memory, as the target's are. */
  mmap: boolean;
  /** Flash attention for the draft, decided from its own head size as for any model. */
  flashAttention: (model: LlamaModel) => boolean | "auto";
  /** Where steps of one sequence run, as the target's do (step-thread.ts). */
  loneSteps: LoneStepPlace;
}

export class DraftModel {
  private constructor(
    private readonly model: LlamaModel,
    /** One per target slot class, in the same order. */
    private readonly contexts: readonly LlamaContext[],
    private readonly options: DraftSpeculation,
  ) {}

  static async load(llama: Llama, spec: DraftSpeculation, shapes: readonly DraftContextShape[], o: DraftLoadOptions): Promise<DraftModel> {
    let model: LlamaModel;
    try {
      model = await llama.loadModel({ modelPath: spec.path, gpuLayers: llama.gpu === false ? 0 : o.gpuLayers, useMmap: o.mmap });
    } catch (err) {
      throw new ModelLoadError(`model "${o.id}": cannot load the draft model ${spec.path}: ${firstLine(err)}`);
    }
    const contexts: LlamaContext[] = [];
    try {
      for (const s of shapes) {
        /** The shape of the step just formed, for where it runs. */
        let sequences = 0;
        let tokens = 0;
        const context = await model.createContext({
          sequences: s.sequences,
          contextSize: s.contextSize,
          batchSize: s.batchSize,
          threads: o.threads,
          // Draft sequence i mirrors target slot i and carries its tagged priority:
          // steps in sequence order keep one ubatch per step here too.
          batching: {
            itemPrioritizationStrategy: (x) => {
              const batch = sequenceOrdered(x);
              sequences = batch.length;
              tokens = tokensIn(batch);
              return batch;
            },
          },
          flashAttention: o.flashAttention(model),
        });
        // Catch-ups (a prompt) share steps with other slots' guesses: always guarded.
        routeStepCalls(context, { stepHere: () => o.loneSteps !== "jobs" && stepsOnJsThread(sequences, tokens), steadyThread: o.loneSteps === "steady-thread" });
        contexts.push(context);
      }
    } catch (err) {
      for (const c of contexts) await c.dispose();
      await model.dispose();
      throw new ModelLoadError(`model "${o.id}": cannot create the draft model's context: ${firstLine(err)}`);
    }
    return new DraftModel(model, contexts, spec);
  }

  /**
   * Refuses a draft whose vocabulary is not the target's, by llama.cpp's own rule for
   * speculative pairs (vocabulary type, BOS/EOS, sizes within 128, the same token texts),
   * at load rather than at a request's first token.
   */
  checkCompatible(id: string, target: LlamaContext): void {
    try {
      // node-llama-cpp runs this check itself when a predictor resets (per generation).
      (target as unknown as { _ctx: { ensureDraftContextIsCompatibleForSpeculative(draft: unknown): void } })._ctx.ensureDraftContextIsCompatibleForSpeculative(
        (this.contexts[0] as unknown as { _ctx: unknown })._ctx,
      );
    } catch (err) {
      throw new ModelLoadError(`model "${id}": the draft model cannot draft for it: ${firstLine(err)}`);
    }
  }

  /**
   * A predictor for the target's next slot of class `slotClass` (one per slot, never
   * shared): asked for in slot order, draft sequence i mirrors target slot i. It stays
   * idle while `crowded` says so.
   */
  predictor(slotClass: number, crowded: () => boolean): TokenPredictor {
    const context = this.contexts[slotClass]!;
    return new DraftAheadPredictor(context.getSequence(), context.contextSize, this.options.tokens, this.options.minConfidence, crowded);
  }

  get memoryUsage(): MemoryFootprint {
    const m = this.model.memoryUsage;
    const out = { ram: m.ram, vram: m.vram };
    for (const c of this.contexts) {
      out.ram += c.memoryUsage.ram;
      out.vram += c.memoryUsage.vram;
    }
    return out;
  }

  get sizeBytes(): number {
    return this.model.size;
  }

  /** After the target's contexts (whose sequences own the predictors) are gone. */
  async dispose(): Promise<void> {
    for (const c of this.contexts) await c.dispose();
    await this.model.dispose();
  }
}

/**
 * Drafts when the target asks, as llama-server does: brings the draft sequence to the
 * target's tokens (dropping the guesses the target refused), then lets it run up to N
 * tokens ahead greedily, stopping at a token it is unsure of, and hands those over.
 *
 * Not node-llama-cpp's DraftSequenceTokenPredictor: that one drafts in the background
 * and, when the target's tokens arrive while a draft token is being computed, keeps
 * tokens the target already has at the head of its guesses (seen here with the target's
 * own weights as the draft: 18 of 44 guesses refused), so most steps verify stale guesses.
 */
export class DraftAheadPredictor extends TokenPredictor {
  /** The target's tokens: its held context and every token since pushed. */
  private state: Token[] = [];
  private priority: SequenceEvaluateOptions["evaluationPriority"];
  private disposed = false;
  /** The prompt step of a generation: nothing to guess yet, the draft takes the prompt in meanwhile. */
  private promptStep = false;
  private catchingUp: Promise<void> | undefined;

  constructor(
    private readonly draft: LlamaContextSequence,
    private readonly contextSize: number,
    private readonly maxTokens: number,
    private readonly minConfidence: number,
    /** True while too many generations run for drafting to pay; the draft then catches up when it is next asked. */
    private readonly crowded: () => boolean = () => false,
  ) {
    super();
  }

  reset({ stateTokens, evaluateOptions }: { stateTokens: Token[]; evaluateOptions: Readonly<SequenceEvaluateOptions> }): void {
    this.state = stateTokens.slice();
    // The target slot's tagged priority: the draft's steps go in sequence order too.
    this.priority = evaluateOptions.evaluationPriority;
    this.promptStep = true;
  }

  pushTokens(tokens: Token[]): void {
    for (const t of tokens) this.state.push(t);
  }

  predictTokens(): Promise<Token[]> | Token[] {
    // Room for the guesses in the draft's context (the target checks its own).
    const room = Math.min(this.maxTokens, this.contextSize - this.state.length - 1);
    if (this.disposed || room < 1 || this.state.length === 0) return [];
    if (this.crowded()) {
      this.promptStep = false;
      return [];
    }
    if (this.promptStep) {
      // Guessing past a prompt would make the first token wait for the draft's prefill and
      // for the target to check the guesses (llama-server drafts from the second token on
      // too): the draft takes the prompt in while the target does.
      this.promptStep = false;
      this.catchingUp = this.catchUp(this.state.length).catch(() => {});
      return [];
    }
    // A draft that fails (a decode error, a disposal) costs its guesses, never the generation.
    return this.draftAhead(room).catch(() => []);
  }

  /** Brings the draft's KV to the target's first `upTo` tokens; returns what is left to evaluate of them. */
  private async align(upTo: number): Promise<Token[]> {
    const held = this.draft.contextTokens;
    const state = this.state;
    let keep = 0;
    const most = Math.min(held.length, upTo);
    while (keep < most && held[keep] === state[keep]) keep++;
    if (keep < this.draft.nextTokenIndex) await this.draft.eraseContextTokenRanges([{ start: keep, end: this.draft.nextTokenIndex }]);
    return state.slice(keep, upTo);
  }

  private async catchUp(upTo: number): Promise<void> {
    const input = await this.align(upTo);
    if (input.length > 0) await this.draft.evaluateWithoutGeneratingNewTokens(input, { evaluationPriority: this.priority });
  }

  private async draftAhead(room: number): Promise<Token[]> {
    await this.catchingUp;
    this.catchingUp = undefined;
    // Keep what the draft holds of the target's tokens; the last one is evaluated again for its logits.
    const input = [...(await this.align(this.state.length - 1)), this.state[this.state.length - 1]!];
    const out: Token[] = [];
    const options: SequenceEvaluateOptions = { temperature: 0, evaluationPriority: this.priority };
    if (this.minConfidence > 0) {
      for await (const { token, confidence } of this.draft.evaluateWithMetadata(input, { confidence: true }, options)) {
        if (confidence < this.minConfidence) break;
        out.push(token);
        if (out.length >= room) break;
      }
    } else {
      for await (const token of this.draft.evaluate(input, options)) {
        out.push(token);
        if (out.length >= room) break;
      }
    }
    return out;
  }

  override dispose(): void {
    this.disposed = true;
  }
}
