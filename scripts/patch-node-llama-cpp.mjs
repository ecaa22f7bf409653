#!/usr/bin/env node
/**
 * Mends one line of node-llama-cpp 3.21.1 after every install (npm's postinstall).
 *
 * Its speculative evaluation (LlamaContextSequence._speculativeEvaluate) checks each
 * predicted token against the model's output for the token before it. For the second
 * prediction on, it reads that output from `validatedTokens`, an array nothing ever
 * fills: so at most one predicted token per step is ever kept, and every later one is
 * evaluated, refuted and erased, whatever the predictor (prompt lookup or a draft model).
 * The output it needs is the one just recorded in `_loadedTokenPredictions`.
 *
 * Idempotent; anything but the exact 3.21.1 text is left alone and said. The engine
 * checks at load whether the mend is in place (src/engine/speculation-check.ts) and, where
 * it is not, predicts one token per step, which the unmended code checks correctly.
 */
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const file = join(root, "node_modules", "node-llama-cpp", "dist", "evaluator", "LlamaContext", "LlamaContext.js");
const BUGGY = ": validatedTokens.at(-1)?.[1];";
const MENDED = ": this._loadedTokenPredictions.at(-1)?.[1]?.[0]; /* mended by spindle: scripts/patch-node-llama-cpp.mjs */";

if (!existsSync(file)) {
  process.stdout.write("patch-node-llama-cpp: node-llama-cpp is not installed; nothing to mend\n");
  process.exit(0);
}
const version = JSON.parse(readFileSync(join(root, "node_modules", "node-llama-cpp", "package.json"), "utf8")).version;
const text = readFileSync(file, "utf8");
if (text.includes(MENDED)) process.exit(0);
const at = text.indexOf(BUGGY);
if (version !== "3.21.1" || at < 0 || text.indexOf(BUGGY, at + 1) >= 0) {
  process.stdout.write(`patch-node-llama-cpp: node-llama-cpp ${version} does not have the line this mends; left as it is (speculation predicts one token per step)\n`);
  process.exit(0);
}
writeFileSync(file, text.slice(0, at) + MENDED + text.slice(at + BUGGY.length));
process.stdout.write("patch-node-llama-cpp: mended the check of speculative predictions in node-llama-cpp 3.21.1\n");
