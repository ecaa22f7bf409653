#!/usr/bin/env node
/**
 * Mends node-llama-cpp 3.21.1 after every install (npm's postinstall). Five mends:
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
 * 4. A steady thread for lone steps and steps run ahead (the same C++ source, local builds only; needs mend 2).
 *    `decodeBatchBegin` hands a decode step to one thread the addon keeps for the process
 *    and returns at once; `decodeBatchEnd` waits for it and returns the settled result, so
 *    the JavaScript thread writes the last token while the step runs. src/engine/step-thread.ts
 *    decides when to use them. A plain greedy step (one token of each of its sequences)
 *    begun with `runAhead` is also sampled there and the step after it decoded at once,
 *    before the JavaScript thread asks for it (src/engine/run-ahead.ts); a step of several
 *    sequences goes there only to run ahead. Needs mends 2 and 3.
 *
 * 5. Candidate arrays (the same C++ source, local builds only). Each request's sampler
 *    sized a fresh candidate array of the whole vocabulary on the JavaScript thread, and
 *    the kernel's page faults on it cost 1.0-1.3 ms per request on the W2 model, while no
 *    token loop could ask for its step. A disposed sampler's array now goes to the next one.
 *
 * The larger pieces of C++ the mends add are in scripts/addon-mends/, one file each.
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

/** A mend's C++ (scripts/addon-mends/NAME), put into the addon's source as it is. */
function fragment(name) {
  return readFileSync(join(root, "scripts", "addon-mends", name), "utf8");
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
  let mended;
  try {
    mended = version === "3.21.1" ? mend(cpp, h, mark) : undefined;
  } catch (err) {
    // A copy of this script without scripts/addon-mends (an image's install step): the
    // prebuilt binaries do not use the source anyway.
    say(`${name}'s mends could not be read (${err.code ?? err.message}); left as it is (${skipped})`);
    return;
  }
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

// 4. Lone steps on a steady thread (needs mend 2's RunHere).
mendAddonClass(
  "AddonContext",
  "/* spindle: steady step thread, run ahead (scripts/patch-node-llama-cpp.mjs) */",
  mendSteady,
  "lone steps run on the JavaScript thread",
  "added decodeBatchBegin and decodeBatchEnd, with steps run ahead",
);

// 5. Candidate arrays kept for the next sampler.
mendAddonClass(
  "AddonSampler",
  "/* spindle: candidate arrays reused (scripts/patch-node-llama-cpp.mjs) */",
  mendCandidates,
  "each new sampler allocates and zeroes a candidate array of the whole vocabulary",
  "added the reuse of candidate arrays",
);

function mendGreedy(cpp, h, mark) {
  const samplerCpp = once(
    cpp,
    "void AddonSampler::sample(struct llama_context* llamaContext, int32_t batchLogitIndex, llama_token_data_array& curP, bool forceGrammar) {\n    setTokenCandidates(llamaContext, batchLogitIndex, curP);\n",
    `${mark}
${fragment("greedy-sample.cpp")}void AddonSampler::sample(struct llama_context* llamaContext, int32_t batchLogitIndex, llama_token_data_array& curP, bool forceGrammar) {
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
        static bool firstMaxToken(struct llama_context* llamaContext, const llama_vocab* vocab, int32_t i, llama_token& token, float& logit);
`,
  );
  if (samplerCpp === undefined || samplerH === undefined) return undefined;
  return { cpp: samplerCpp, h: samplerH };
}

/**
 * Every evaluation node-llama-cpp starts (every request) makes a new sampler, whose
 * constructor sizes a candidate array to the whole vocabulary (384 KiB for 32,000 tokens)
 * on the JavaScript thread. That memory is fresh every time (the array is freed only when
 * V8 finalizes the sampler), so each page of it faults on first touch: 1.0-1.3 ms per
 * request on this VM, during which no token loop can ask for its next step. Measured with
 * perf: the time is the kernel's page faults under std::vector::resize. The mend hands a
 * disposed sampler's array to the next sampler made (a spare list, bounded), so only the
 * first few samplers of a process pay. Arrays keep their size: every reader takes the
 * candidate count from the sample (curP.size), never from the array.
 */
function mendCandidates(cpp, h, mark) {
  let out = once(
    cpp,
    "    tokenCandidates.resize(llama_vocab_n_tokens(model->vocab));\n    tokenCandidates.reserve(llama_vocab_n_tokens(model->vocab));\n}\n",
    `    spindleTakeCandidates(tokenCandidates, llama_vocab_n_tokens(model->vocab));
}
`,
  );
  if (out === undefined) return undefined;
  out = once(
    out,
    "    disposed = true;\n\n    model->Unref();\n",
    `    disposed = true;

    spindleGiveCandidates(tokenCandidates);
    model->Unref();
`,
  );
  if (out === undefined) return undefined;
  out = once(
    out,
    "AddonSampler::AddonSampler(const Napi::CallbackInfo& info)",
    `${mark}
${fragment("candidate-arrays.cpp")}AddonSampler::AddonSampler(const Napi::CallbackInfo& info)`,
  );
  if (out === undefined) return undefined;
  out = out.includes("#include <mutex>") ? out : once(out, "#include <cmath>\n", "#include <cmath>\n#include <mutex>\n");
  if (out === undefined) return undefined;
  return { cpp: out, h };
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

/**
 * Mend 4: `decodeBatchBegin(runAhead)` hands the step to one thread kept for the process
 * and returns at once: 1, or 0 where that thread is busy with another context's steps,
 * or 2 where the step was run ahead already (below);
 * `decodeBatchEnd()` waits for it and returns the settled promise, as `decodeBatchNow`
 * does. The steady thread spins a short while after each step before it sleeps, so the
 * next step, which comes after this one's samples, is taken without a wake-up.
 *
 * Running ahead: a step begun with `runAhead` true, one token of each of its sequences,
 * whose samplers are all plain greedy (the caller vouches for that), is sampled on the
 * steady thread as soon as it is decoded, by the same first-maximum rule as mend 3, and
 * the tokens it gives are decoded at once, on the same thread, as the step after it
 * (unless one is an end of generation). When the caller then begins exactly that step
 * (same sequences, positions and tokens) it takes the one already running or done
 * ("adopts" it), and where it asks to run ahead again the chain goes on without waiting
 * for the JavaScript thread. The samples the caller reads of a step so sampled are the
 * tokens kept (its logits are gone: the step ahead overwrote them). Every other call on
 * the context that reads or edits its state first stops a step running ahead that nobody
 * adopted (the context's abort callback, read by ggml between the graph's nodes: a new
 * request's prefill then waits a fraction of a step for it, not a whole one), waits for
 * it, and drops it (its KV cells are erased).
 */
function mendSteady(cpp, h, mark) {
  let out = editBetween(cpp, "class AddonContextDecodeBatchWorker : public Napi::AsyncWorker {", "class AddonContextLoadContextWorker", (w) =>
    once(
      w,
      "        bool failed = false;\n",
      `        ${mark}
        // The job's two halves, for the steady thread: Execute there, settle here. Its own
        // promise was made in the call that began the step, and a handle to it is not valid
        // in a later call: so the caller gets a promise made in this one, and the first is
        // resolved (never rejected: nobody holds it to handle a rejection) to release it.
        void ExecuteThere() {
            Execute();
        }
        Napi::Promise Settle() {
            Napi::Promise::Deferred settled = Napi::Promise::Deferred::New(Env());
            OnOK();
            if (failed) {
                settled.Reject(Napi::Error::New(Env(), failure).Value());
            } else {
                settled.Resolve(Env().Undefined());
            }
            return settled.Promise();
        }
        bool failed = false;
`,
    ),
  );
  if (out === undefined) return undefined;
  out = once(
    out,
    "Napi::Value AddonContext::DecodeBatchNow(const Napi::CallbackInfo& info) {\n",
    `${mark}
${fragment("steady-thread.cpp")}Napi::Value AddonContext::DecodeBatchNow(const Napi::CallbackInfo& info) {
    spindleDropAhead();
`,
  );
  if (out === undefined) return undefined;
  out = once(
    out,
    "Napi::Value AddonContext::SampleTokenNow(const Napi::CallbackInfo& info) {\n",
    `Napi::Value AddonContext::SampleTokenNow(const Napi::CallbackInfo& info) {
    {
        std::lock_guard<std::mutex> lock(spindleSteady::state.mutex);
        if (sampleCached) {
            return spindleCachedSample(info, cachedSamples);
        }
        if (aheadState != 0) {
            Napi::Error::New(info.Env(), "A step was run ahead of this sample").ThrowAsJavaScriptException();
            return info.Env().Undefined();
        }
    }
`,
  );
  if (out === undefined) return undefined;
  // Every other call that reads or edits the context's state drops a step run ahead first.
  for (const name of ["DisposeSequence", "RemoveTokenCellsFromSequence", "ShiftSequenceTokenCells", "GetSequenceKvCacheMinPosition", "GetSequenceKvCacheMaxPosition", "DecodeBatch", "SampleToken", "GetEmbedding", "GetStateSize", "SaveSequenceStateToFile", "LoadSequenceStateFromFile", "SetLoras", "RestoreCheckpoint"]) {
    const head = `Napi::Value AddonContext::${name}(const Napi::CallbackInfo& info) {\n`;
    out = out === undefined ? undefined : once(out, head, `${head}    spindleDropAhead();\n`);
  }
  if (out === undefined) return undefined;
  out = once(out, "void AddonContext::disposeMemory() {\n", "void AddonContext::disposeMemory() {\n    spindleDropAhead();\n");
  if (out === undefined) return undefined;
  out = once(
    out,
    "    AddonContext * context = Napi::ObjectWrap<AddonContext>::Unwrap(info[0].As<Napi::Object>());\n    if (disposed || context->disposed || !context->contextLoaded) {\n",
    "    AddonContext * context = Napi::ObjectWrap<AddonContext>::Unwrap(info[0].As<Napi::Object>());\n    context->spindleDropAhead();\n    if (disposed || context->disposed || !context->contextLoaded) {\n",
  );
  if (out === undefined) return undefined;
  out = once(out, '                InstanceMethod("decodeBatchNow", &AddonContext::DecodeBatchNow),\n', '                InstanceMethod("decodeBatchNow", &AddonContext::DecodeBatchNow),\n                InstanceMethod("decodeBatchBegin", &AddonContext::DecodeBatchBegin),\n                InstanceMethod("decodeBatchEnd", &AddonContext::DecodeBatchEnd),\n');
  if (out === undefined) return undefined;
  out = once(out, "#include <thread>\n", "#include <thread>\n#include <atomic>\n#include <chrono>\n#include <condition_variable>\n#include <mutex>\n#include <string>\n#include <vector>\n#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)\n#include <immintrin.h>\n#endif\n");
  let header = once(
    h,
    "        Napi::Value SampleTokenNow(const Napi::CallbackInfo& info);\n",
    `        Napi::Value SampleTokenNow(const Napi::CallbackInfo& info);\n        ${mark}\n        Napi::Value DecodeBatchBegin(const Napi::CallbackInfo& info);\n        Napi::Value DecodeBatchEnd(const Napi::CallbackInfo& info);\n`,
  );
  header =
    header &&
    once(
      header,
      "        bool disposed = false;\n        bool memoryDisposed = false;\n",
      `        bool disposed = false;
        bool memoryDisposed = false;

        // spindle: the steady thread (scripts/patch-node-llama-cpp.mjs), under its mutex.
        // The step begun there: 0 none, 1 running, 2 done and not yet ended.
        int stepState = 0;
        AddonContextDecodeBatchWorker* steadyStep = nullptr;
        bool steadyArm = false;
        std::string stepFailure;
        // The step run ahead (one token of each of its sequences): 0 none, 1 running, 2 done
        // and nobody's.
        int aheadState = 0;
        std::vector<llama_seq_id> aheadSeqs;
        std::vector<llama_pos> aheadPositions;
        std::vector<llama_token> aheadTokens;
        bool aheadAdopted = false;
        bool aheadArmed = false;
        // Set to stop a step running ahead that nobody will adopt (spindleDropAhead).
        std::atomic<bool> aheadCancel{false};
        bool aheadAbortHooked = false;
        // The last step begun was sampled there: the token each of its outputs gives.
        bool sampleCached = false;
        std::vector<llama_token> cachedSamples;
        void spindleDropAhead();
`,
    );
  header = header && once(header, "class AddonContext : public Napi::ObjectWrap<AddonContext> {\n", "class AddonContextDecodeBatchWorker;\n\nclass AddonContext : public Napi::ObjectWrap<AddonContext> {\n");
  if (out === undefined || header === undefined) return undefined;
  return { cpp: out, h: header };
}
