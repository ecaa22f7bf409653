#!/usr/bin/env node
/**
 * Mends node-llama-cpp 3.21.1 after every install (npm's postinstall). Four mends:
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
 * 4. A steady thread for lone steps (the same C++ source, local builds only; needs mend 2).
 *    `decodeBatchBegin` hands a decode step to one thread the addon keeps for the process
 *    and returns at once; `decodeBatchEnd` waits for it and returns the settled result, so
 *    the JavaScript thread writes the last token while the step runs. src/engine/step-thread.ts
 *    decides when to use them.
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

// 4. Lone steps on a steady thread (needs mend 2's RunHere).
mendAddonClass(
  "AddonContext",
  "/* spindle: steady step thread (scripts/patch-node-llama-cpp.mjs) */",
  mendSteady,
  "lone steps run on the JavaScript thread",
  "added decodeBatchBegin and decodeBatchEnd",
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

/**
 * Mend 4: `decodeBatchBegin()` hands the step to one thread kept for the process and
 * returns at once (false where that thread is busy with another context's step);
 * `decodeBatchEnd()` waits for it and returns the settled promise, as `decodeBatchNow`
 * does. The steady thread spins a short while after each step before it sleeps, so the
 * next step, which comes after this one's samples, is taken without a wake-up.
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
// One thread for the process runs the decode steps handed to it, one at a time, while the
// JavaScript thread goes on (its socket writes). After a step it spins a short while for
// the next, which comes after the step's samples and a few microtasks, then sleeps; the
// JavaScript thread sleeps at once when it must wait for a step (spinning there slowed
// the step beside it by ~15% on the W2 model). Allocated once and never freed: the
// detached thread may still wait on it when the process exits.
namespace spindleSteady {
    struct State {
        std::mutex mutex;
        std::condition_variable wake;
        // 0: idle, 3: taken by a JavaScript thread, 1: a step handed over, 2: its result ready.
        std::atomic<int> phase{0};
        AddonContextDecodeBatchWorker* step = nullptr;
        std::once_flag started;
    };
    static State& state = *new State();
    static const int64_t stepThreadSpinNs = 2000000;

    static inline void relax() {
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
        _mm_pause();
#elif defined(__aarch64__) || defined(__arm__)
        __asm__ __volatile__("yield");
#endif
    }

    static void waitFor(int want, int64_t spinNs) {
        if (spinNs > 0) {
            const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spinNs);
            for (uint32_t i = 1;; i++) {
                if (state.phase.load(std::memory_order_acquire) == want) return;
                relax();
                if ((i & 63) == 0 && std::chrono::steady_clock::now() >= until) break;
            }
        }
        std::unique_lock<std::mutex> lock(state.mutex);
        state.wake.wait(lock, [want] { return state.phase.load(std::memory_order_acquire) == want; });
    }

    static void set(int to) {
        {
            std::lock_guard<std::mutex> lock(state.mutex);
            state.phase.store(to, std::memory_order_release);
        }
        state.wake.notify_all();
    }

    static void run() {
        for (;;) {
            waitFor(1, stepThreadSpinNs);
            state.step->ExecuteThere();
            set(2);
        }
    }
}

Napi::Value AddonContext::DecodeBatchBegin(const Napi::CallbackInfo& info) {
    int idle = 0;
    if (!spindleSteady::state.phase.compare_exchange_strong(idle, 3, std::memory_order_acq_rel)) {
        return Napi::Boolean::New(info.Env(), false);
    }
    std::call_once(spindleSteady::state.started, [] { std::thread(spindleSteady::run).detach(); });
    spindleSteady::state.step = new AddonContextDecodeBatchWorker(info.Env(), this);
    spindleSteady::set(1);
    return Napi::Boolean::New(info.Env(), true);
}

Napi::Value AddonContext::DecodeBatchEnd(const Napi::CallbackInfo& info) {
    AddonContextDecodeBatchWorker* worker = spindleSteady::state.step;
    if (worker == nullptr || worker->ctx != this) {
        Napi::Error::New(info.Env(), "No step of this context was begun").ThrowAsJavaScriptException();
        return info.Env().Undefined();
    }
    spindleSteady::waitFor(2, 0);
    spindleSteady::state.step = nullptr;
    spindleSteady::state.phase.store(0, std::memory_order_release);
    Napi::Promise promise = worker->Settle();
    delete worker;
    return promise;
}

Napi::Value AddonContext::DecodeBatchNow(const Napi::CallbackInfo& info) {
`,
  );
  if (out === undefined) return undefined;
  out = once(out, '                InstanceMethod("decodeBatchNow", &AddonContext::DecodeBatchNow),\n', '                InstanceMethod("decodeBatchNow", &AddonContext::DecodeBatchNow),\n                InstanceMethod("decodeBatchBegin", &AddonContext::DecodeBatchBegin),\n                InstanceMethod("decodeBatchEnd", &AddonContext::DecodeBatchEnd),\n');
  if (out === undefined) return undefined;
  out = once(out, "#include <thread>\n", "#include <thread>\n#include <atomic>\n#include <chrono>\n#include <condition_variable>\n#include <mutex>\n#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)\n#include <immintrin.h>\n#endif\n");
  const header = once(
    h,
    "        Napi::Value SampleTokenNow(const Napi::CallbackInfo& info);\n",
    `        Napi::Value SampleTokenNow(const Napi::CallbackInfo& info);\n        ${mark}\n        Napi::Value DecodeBatchBegin(const Napi::CallbackInfo& info);\n        Napi::Value DecodeBatchEnd(const Napi::CallbackInfo& info);\n`,
  );
  if (out === undefined || header === undefined) return undefined;
  return { cpp: out, h: header };
}
