/**
 * Which sequences may have their next step run ahead (a local build's steady thread:
 * scripts/patch-node-llama-cpp.mjs, mend 4). Where every sequence of a step of one token
 * each is marked, the steady thread samples the step itself, greedily, and decodes the
 * tokens it gives as the step after it at once, so that step no longer waits for the
 * JavaScript thread to take the tokens and ask for the next one. The thread trusts what
 * it is told: a sequence is marked only while its sampler is plain greedy (temperature 0
 * and nothing else in the chain, nothing read but the token) and only while its token
 * loop will ask for the step after this one (the scheduler also says no while a request
 * is starting or expected: StepTracker.quietFor). A step run ahead that nobody asks for
 * (a stop string, a cancel, a new request's prefill joining) is stopped where it is and
 * erased by the context's next call.
 */
import type { LlamaContext } from "node-llama-cpp";

export class RunAheadMarks {
  /** By sequence id within the context: whether the loop still wants a step after the one asked for. */
  private readonly wants: Array<(() => boolean) | undefined> = [];

  set(sequence: number, moreWanted: (() => boolean) | undefined): void {
    this.wants[sequence] = moreWanted;
  }

  /** Read as a step of one token of each of these sequences is begun (the first `n` of `sequences`). */
  allWanted(sequences: readonly number[], n: number): boolean {
    if (n === 0) return false;
    for (let i = 0; i < n; i++) {
      const more = this.wants[sequences[i]!];
      if (more === undefined || !more()) return false;
    }
    return true;
  }
}

const marks = new WeakMap<LlamaContext, RunAheadMarks>();

/** The context's marks, made on first use. */
export function runAheadMarksOf(context: LlamaContext): RunAheadMarks {
  let m = marks.get(context);
  if (m === undefined) marks.set(context, (m = new RunAheadMarks()));
  return m;
}

/** Sampling whose every token a plain greedy sampler picks, with nothing read but the token. */
export function plainGreedy(s: { temperature: number; presencePenalty: number; frequencyPenalty: number; repeatPenalty: number }, extras: { grammar?: unknown; tokenBias?: unknown; probe?: unknown }): boolean {
  return s.temperature === 0 && s.presencePenalty === 0 && s.frequencyPenalty === 0 && s.repeatPenalty === 1 && extras.grammar === undefined && extras.tokenBias === undefined && extras.probe === undefined;
}
