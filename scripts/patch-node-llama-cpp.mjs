#!/usr/bin/env node
/**
 * Mends node-llama-cpp 3.21.1 after every install (npm's postinstall). Two mends:
 *
 * 1. Its JavaScript (used by every binary). Its speculative evaluation
 *    (LlamaContextSequence._speculativeEvaluate) checks each predicted token against the
 *    model's output for the token before it. For the second prediction on, it reads that
 *    output from `validatedTokens`, an array nothing ever fills: so at most one predicted
 *    token per step is ever kept, and every later one is evaluated, refuted and erased,
 *    whatever the predictor (prompt lookup or a draft model). The output it needs is the
 *    one just recorded in `_loadedTokenPredictions`. The engine checks at load whether this
 *    mend is in place (src/engine/speculation.ts) and, where it is not, predicts one token
 *    per step, which the unmended code checks correctly.
 *
 * 2. Its addon's C++ source (used only by a local build, `npm run engine:build`, which
 *    compiles that source; the prebuilt binaries are untouched). The addon runs every
 *    decode step and every sample in a libuv job of its own: four thread hand-offs per
 *    token, pure delay when one sequence runs. The mend adds `decodeBatchNow` and
 *    `sampleTokenNow`, the same jobs run on the calling (JavaScript) thread and returned
 *    as settled promises; src/engine/step-thread.ts decides when to use them.
 *
 * 3. Greedy samples (the same C++ source, local builds only). At temperature 0 with no
 *    penalties, bias, XTC or grammar, the sampler chain copies all of the model's logits
 *    into a candidate array (32,000 entries for a Llama-2 vocabulary) and then scans that
 *    for the first maximum. The mend scans the logits themselves, by the same
 *    first-maximum rule, so the same token: a sample call took 26.6 µs instead of 36.2 on
 *    the W2 model (`npm run bench -- micro step-thread`).
 *
 * Idempotent; anything but the exact 3.21.1 text is left alone and said.
 */
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const pkg = join(root, "node_modules", "node-llama-cpp");

if (!existsSync(join(pkg, "package.json"))) {
  process.stdout.write("patch-node-llama-cpp: node-llama-cpp is not installed; nothing to mend\n");
  process.exit(0);
}
const version = JSON.parse(readFileSync(join(pkg, "package.json"), "utf8")).version;
const say = (line) => process.stdout.write(`patch-node-llama-cpp: ${line}\n`);

/** Replaces the one occurrence of `from` by `to` in `text`; undefined when it is not there exactly once. */
function once(text, from, to) {
  const at = text.indexOf(from);
  if (at < 0 || text.indexOf(from, at + 1) >= 0) return undefined;
  return text.slice(0, at) + to + text.slice(at + from.length);
}

// 1. The check of speculative predictions (JavaScript).
{
  const file = join(pkg, "dist", "evaluator", "LlamaContext", "LlamaContext.js");
  const BUGGY = ": validatedTokens.at(-1)?.[1];";
  const MENDED = ": this._loadedTokenPredictions.at(-1)?.[1]?.[0]; /* mended by spindle: scripts/patch-node-llama-cpp.mjs */";
  const text = readFileSync(file, "utf8");
  if (!text.includes(MENDED)) {
    const mended = version === "3.21.1" ? once(text, BUGGY, MENDED) : undefined;
    if (mended === undefined) say(`node-llama-cpp ${version} does not have the line this mends; left as it is (speculation predicts one token per step)`);
    else {
      writeFileSync(file, mended);
      say("mended the check of speculative predictions in node-llama-cpp 3.21.1");
    }
  }
}

/**
 * Mends one class's C++ source and header in the addon (for local builds) with `mend(cpp,
 * h, mark)`, once: `mark` in the source says it is done. `skipped` ends the line said when
 * the source is not the exact 3.21.1 text; `done` is said when it is mended.
 */
function mendAddonClass(name, mark, mend, skipped, done) {
  const cppFile = join(pkg, "llama", "addon", `${name}.cpp`);
  const hFile = join(pkg, "llama", "addon", `${name}.h`);
  const cpp = existsSync(cppFile) ? readFileSync(cppFile, "utf8") : "";
  const h = existsSync(hFile) ? readFileSync(hFile, "utf8") : "";
  if (cpp.includes(mark)) return;
  const mended = version === "3.21.1" ? mend(cpp, h, mark) : undefined;
  if (mended === undefined) {
    say(`node-llama-cpp ${version}'s ${name} source is not the one this mends; left as it is (${skipped})`);
    return;
  }
  writeFileSync(cppFile, mended.cpp);
  writeFileSync(hFile, mended.h);
  say(`${done} in node-llama-cpp 3.21.1's addon source (used by local builds: npm run engine:build)`);
}

// 2. Steps and samples on the calling thread.
mendAddonClass(
  "AddonContext",
  "/* spindle: decodeBatchNow, sampleTokenNow (scripts/patch-node-llama-cpp.mjs) */",
  mendAddon,
  "a local build runs every step in libuv jobs",
  "added decodeBatchNow and sampleTokenNow",
);

// 3. Greedy samples: the logits scanned in place.
mendAddonClass(
  "AddonSampler",
  "/* spindle: greedy samples (scripts/patch-node-llama-cpp.mjs) */",
  mendGreedy,
  "greedy samples go through the whole sampler chain",
  "added the greedy scan of the logits",
);

function mendGreedy(cpp, h, mark) {
  const samplerCpp = once(
    cpp,
    "void AddonSampler::sample(struct llama_context* llamaContext, int32_t batchLogitIndex, llama_token_data_array& curP, bool forceGrammar) {\n    setTokenCandidates(llamaContext, batchLogitIndex, curP);\n",
    `${mark}
// Temperature 0 and nothing else in the chain: the greedy sampler alone.
bool AddonSampler::isPlainGreedy() const {
    return !disposed && greedySampler != nullptr && tokenBiasSampler == nullptr && repeatPenaltySampler == nullptr &&
        dryRepeatPenaltySampler == nullptr && xtcSampler == nullptr &&
        (grammarEvaluationState == nullptr || grammarEvaluationState->sampler == nullptr);
}

// What llama_sampler_greedy_apply does to the full candidate array (the first of the
// highest logits), read from the logits themselves; false where there are no plain logits.
bool AddonSampler::sampleGreedy(struct llama_context* llamaContext, int32_t batchLogitIndex, llama_token_data_array& curP) {
    if (llama_get_sampled_probs_ith(llamaContext, batchLogitIndex) != nullptr || llama_get_sampled_logits_ith(llamaContext, batchLogitIndex) != nullptr) {
        return false;
    }

    const float* logits = llama_get_logits_ith(llamaContext, batchLogitIndex);
    const int32_t vocabLength = llama_vocab_n_tokens(model->vocab);
    if (logits == nullptr || vocabLength <= 0) {
        return false;
    }

    llama_token best = 0;
    float bestLogit = logits[0];
    for (llama_token tokenId = 1; tokenId < vocabLength; tokenId++) {
        if (logits[tokenId] > bestLogit) {
            bestLogit = logits[tokenId];
            best = tokenId;
        }
    }

    tokenCandidates[0] = llama_token_data { best, bestLogit, 0.0f };
    curP.data = tokenCandidates.data();
    curP.size = 1;
    curP.selected = 0;
    curP.sorted = false;
    return true;
}

void AddonSampler::sample(struct llama_context* llamaContext, int32_t batchLogitIndex, llama_token_data_array& curP, bool forceGrammar) {
    // forceGrammar: the caller reads more than the token (probabilities, confidence).
    if (!forceGrammar && isPlainGreedy() && sampleGreedy(llamaContext, batchLogitIndex, curP)) {
        return;
    }

    setTokenCandidates(llamaContext, batchLogitIndex, curP);
`,
  );
  const samplerH = once(
    h,
    "        void setTokenCandidates(struct llama_context* llamaContext, int32_t batchLogitIndex, llama_token_data_array& curP);\n",
    `        void setTokenCandidates(struct llama_context* llamaContext, int32_t batchLogitIndex, llama_token_data_array& curP);
        ${mark}
        bool isPlainGreedy() const;
        bool sampleGreedy(struct llama_context* llamaContext, int32_t batchLogitIndex, llama_token_data_array& curP);
`,
  );
  if (samplerCpp === undefined || samplerH === undefined) return undefined;
  return { cpp: samplerCpp, h: samplerH };
}

/** Gives a worker class RunHere(): its job run on the calling thread, its promise settled (errors kept where that thread reads them). */
function addRunHere(worker, setErrors, mark) {
  if ((worker.match(/SetError\(/g) ?? []).length !== setErrors) return undefined;
  return once(
    worker.replaceAll("SetError(", "Fail("),
    "        Napi::Promise GetPromise() {\n            return deferred.Promise();\n        }\n",
    `        Napi::Promise GetPromise() {
            return deferred.Promise();
        }

        ${mark}
        // Runs the job on the calling thread and settles its promise; never queued, so
        // the caller deletes the worker.
        Napi::Promise RunHere() {
            Execute();
            if (failed) {
                OnError(Napi::Error::New(Env(), failure));
            } else {
                OnOK();
            }
            return GetPromise();
        }
        bool failed = false;
        std::string failure;
        void Fail(const std::string& message) {
            failed = true;
            failure = message;
            SetError(message);
        }
`,
  );
}

/** Replaces the text from `startText` up to `endText` (exclusive) by `edit` of it. */
function editBetween(text, startText, endText, edit) {
  const start = text.indexOf(startText);
  const end = text.indexOf(endText, start);
  if (start < 0 || end < start) return undefined;
  const edited = edit(text.slice(start, end));
  return edited === undefined ? undefined : text.slice(0, start) + edited + text.slice(end);
}

function mendAddon(cpp, h, mark) {
  let out = editBetween(cpp, "class AddonContextDecodeBatchWorker : public Napi::AsyncWorker {", "class AddonContextLoadContextWorker", (w) => addRunHere(w, 4, mark));
  if (out === undefined) return undefined;
  out = editBetween(out, "class AddonContextSampleTokenWorker : public Napi::AsyncWorker {", "AddonContext::AddonContext(const Napi::CallbackInfo& info)", (w) => addRunHere(w, 5, mark));
  if (out === undefined) return undefined;
  out = once(
    out,
    "Napi::Value AddonContext::SampleToken(const Napi::CallbackInfo& info) {\n    AddonContextSampleTokenWorker* worker = new AddonContextSampleTokenWorker(info, this);\n    worker->Queue();\n    return worker->GetPromise();\n}\n",
    `Napi::Value AddonContext::SampleToken(const Napi::CallbackInfo& info) {
    AddonContextSampleTokenWorker* worker = new AddonContextSampleTokenWorker(info, this);
    worker->Queue();
    return worker->GetPromise();
}
${mark}
Napi::Value AddonContext::DecodeBatchNow(const Napi::CallbackInfo& info) {
    AddonContextDecodeBatchWorker* worker = new AddonContextDecodeBatchWorker(info.Env(), this);
    Napi::Promise promise = worker->RunHere();
    delete worker;
    return promise;
}
Napi::Value AddonContext::SampleTokenNow(const Napi::CallbackInfo& info) {
    AddonContextSampleTokenWorker* worker = new AddonContextSampleTokenWorker(info, this);
    Napi::Promise promise = worker->RunHere();
    delete worker;
    return promise;
}
`,
  );
  if (out === undefined) return undefined;
  out = once(
    out,
    '                InstanceMethod("sampleToken", &AddonContext::SampleToken),\n',
    '                InstanceMethod("sampleToken", &AddonContext::SampleToken),\n                InstanceMethod("decodeBatchNow", &AddonContext::DecodeBatchNow),\n                InstanceMethod("sampleTokenNow", &AddonContext::SampleTokenNow),\n',
  );
  const header = once(
    h,
    "        Napi::Value SampleToken(const Napi::CallbackInfo& info);\n",
    `        Napi::Value SampleToken(const Napi::CallbackInfo& info);\n        ${mark}\n        Napi::Value DecodeBatchNow(const Napi::CallbackInfo& info);\n        Napi::Value SampleTokenNow(const Napi::CallbackInfo& info);\n`,
  );
  if (out === undefined || header === undefined) return undefined;
  return { cpp: out, h: header };
}
