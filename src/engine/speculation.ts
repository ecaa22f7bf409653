/**
 * Whether node-llama-cpp can keep more than one predicted token per step. Its 3.21.1
 * check of predictions reads the model's output for the second prediction on from an
 * array nothing fills, so it refuses every prediction after the first; npm's postinstall
 * mends that line (scripts/patch-node-llama-cpp.mjs). Where the mend is missing (an
 * install that skipped scripts), speculation predicts one token per step, which the
 * unmended check handles correctly, rather than evaluating guesses it must throw away.
 */
import { InputLookupTokenPredictor, LlamaContextSequence, type Token, type TokenPredictor } from "node-llama-cpp";
import type { DraftModel } from "./draft.js";
import { DEFAULT_DRAFT_DISABLE_BY_BATCH_SIZE, type SpeculativeOptions } from "./types.js";

export function predictionCheckMended(): boolean {
  const evaluate = (LlamaContextSequence.prototype as unknown as { _speculativeEvaluate?: unknown })._speculativeEvaluate;
  return typeof evaluate === "function" && evaluate.toString().includes("mended by spindle");
}

/** The speculation a load gets: as asked, or one token per step on an unmended node-llama-cpp (said once per load). */
export function effectiveSpeculation(spec: SpeculativeOptions | undefined, id: string, warn: ((message: string) => void) | undefined): SpeculativeOptions | undefined {
  if (spec === undefined || spec.tokens === 1 || predictionCheckMended()) return spec;
  warn?.(`model "${id}": node-llama-cpp's check of predicted tokens is not mended (npm's install scripts did not run: node scripts/patch-node-llama-cpp.mjs); speculating one token per step`);
  return { ...spec, tokens: 1 };
}

/** Prompt lookup that predicts nothing while `crowded` says so. */
class GatedLookupPredictor extends InputLookupTokenPredictor {
  constructor(
    options: ConstructorParameters<typeof InputLookupTokenPredictor>[0],
    private readonly crowded: () => boolean,
  ) {
    super(options);
  }

  override predictTokens(): Token[] {
    return this.crowded() ? [] : super.predictTokens();
  }
}

/**
 * Makes each slot's predictor (node-llama-cpp's rule: one per sequence, never shared), or
 * undefined without speculation. `running` counts the version's generations: above the
 * speculation's `disableByBatchSize` its predictors stay idle.
 */
export function predictorFactory(spec: SpeculativeOptions | undefined, draft: DraftModel | undefined, running: () => number): ((slotClass: number) => TokenPredictor) | undefined {
  if (spec === undefined) return undefined;
  const limit = spec.disableByBatchSize ?? (spec.method === "draft" ? DEFAULT_DRAFT_DISABLE_BY_BATCH_SIZE : Infinity);
  const crowded = () => running() > limit;
  if (spec.method === "ngram") {
    const options = { patternLength: { min: spec.minPattern }, predictionLength: { min: 1, max: spec.tokens } };
    return () => (limit === Infinity ? new InputLookupTokenPredictor(options) : new GatedLookupPredictor(options, crowded));
  }
  if (!draft) throw new Error("a draft speculation needs its draft model loaded");
  return (slotClass) => draft.predictor(slotClass, crowded);
}
