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
// Never destroyed: samplers finalized at exit may still give theirs back.
static std::mutex& spindleSpareMutex() {
    static std::mutex* mutex = new std::mutex();
    return *mutex;
}
static std::vector<std::vector<llama_token_data>>& spindleSpareCandidates() {
    static auto* spare = new std::vector<std::vector<llama_token_data>>();
    return *spare;
}
static size_t spindleSpareBytes = 0;
static const size_t spindleSpareMaxBytes = size_t(64) << 20;

// A spare array of at least \`size\` entries, else a new one.
static void spindleTakeCandidates(std::vector<llama_token_data>& into, size_t size) {
    {
        std::lock_guard<std::mutex> lock(spindleSpareMutex());
        auto& spare = spindleSpareCandidates();
        for (size_t i = spare.size(); i-- > 0;) {
            if (spare[i].size() >= size) {
                spindleSpareBytes -= spare[i].capacity() * sizeof(llama_token_data);
                into.swap(spare[i]);
                spare.erase(spare.begin() + i);
                return;
            }
        }
    }
    into.resize(size);
}

// Keeps the array for the next sampler, up to spindleSpareMaxBytes in all; \`from\` is left empty.
static void spindleGiveCandidates(std::vector<llama_token_data>& from) {
    const size_t bytes = from.capacity() * sizeof(llama_token_data);
    if (bytes > 0) {
        std::lock_guard<std::mutex> lock(spindleSpareMutex());
        if (spindleSpareBytes + bytes <= spindleSpareMaxBytes) {
            spindleSpareBytes += bytes;
            spindleSpareCandidates().push_back(std::move(from));
        }
    }
    std::vector<llama_token_data>().swap(from);
}

AddonSampler::AddonSampler(const Napi::CallbackInfo& info)`,
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
// One thread for the process runs the decode steps handed to it, one context's at a
// time, while the JavaScript thread goes on (its socket writes). After a step it spins a
// short while for the next, which comes after the step's samples and a few microtasks,
// then sleeps; the JavaScript thread sleeps at once when it must wait for a step
// (spinning there slowed the step beside it by ~15% on the W2 model). Allocated once and
// never freed: the detached thread may still wait on it when the process exits. Every
// context's step fields (AddonContext.h) are read and written under its mutex.
namespace spindleSteady {
    struct State {
        std::mutex mutex;
        // The steady thread waits on it for a step; JavaScript threads, for their step's end.
        std::condition_variable wake;
        std::condition_variable settled;
        // The context whose steps the thread runs (null: free); a compare-and-swap claims it,
        // and the thread frees it when it stops.
        std::atomic<AddonContext*> owner{nullptr};
        std::atomic<bool> handed{false};
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

    static void waitForStep() {
        const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(stepThreadSpinNs);
        for (uint32_t i = 1;; i++) {
            if (state.handed.load(std::memory_order_acquire)) return;
            relax();
            if ((i & 63) == 0 && std::chrono::steady_clock::now() >= until) break;
        }
        std::unique_lock<std::mutex> lock(state.mutex);
        state.wake.wait(lock, [] { return state.handed.load(std::memory_order_acquire); });
    }

    // What a plain greedy sampler picks from output \`i\` of the step just decoded (the first of
    // the highest logits: AddonSampler::sampleGreedy); false where there are no plain logits.
    static bool greedyToken(AddonContext* c, int32_t i, llama_token& token) {
        if (llama_get_sampled_probs_ith(c->ctx, i) != nullptr || llama_get_sampled_logits_ith(c->ctx, i) != nullptr) {
            return false;
        }
        const float* logits = llama_get_logits_ith(c->ctx, i);
        const int32_t vocabLength = llama_vocab_n_tokens(c->model->vocab);
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
        token = best;
        return true;
    }

    static bool greedyTokens(AddonContext* c, size_t n, std::vector<llama_token>& tokens) {
        tokens.resize(n);
        for (size_t i = 0; i < n; i++) {
            if (!greedyToken(c, static_cast<int32_t>(i), tokens[i])) {
                return false;
            }
        }
        return true;
    }

    // A step that can be run ahead from: one token of each of its sequences, in increasing
    // sequence order, each with an output.
    static bool oneTokenEach(const llama_batch& batch) {
        if (batch.n_tokens < 1) {
            return false;
        }
        for (int32_t i = 0; i < batch.n_tokens; i++) {
            if (!batch.logits[i] || batch.n_seq_id[i] != 1 || (i > 0 && batch.seq_id[i][0] <= batch.seq_id[i - 1][0])) {
                return false;
            }
        }
        return true;
    }

    // The step run ahead, in a batch of its own (the context's batch is the JavaScript
    // thread's to fill meanwhile).
    static bool aheadCancelled(void* data) {
        return static_cast<std::atomic<bool>*>(data)->load(std::memory_order_relaxed);
    }

    // llama.cpp logs a stopped decode as three errors: not for a step run ahead that was
    // stopped on purpose (on this thread, while its context's cancel is set).
    static std::atomic<ggml_log_callback> logPassOn{nullptr};
    static std::atomic<void*> logPassOnData{nullptr};
    static thread_local const std::atomic<bool>* cancelHere = nullptr;
    static void logUnlessCancelled(ggml_log_level level, const char* text, void* data) {
        if (cancelHere != nullptr && cancelHere->load(std::memory_order_relaxed)) {
            return;
        }
        ggml_log_callback passOn = logPassOn.load(std::memory_order_acquire);
        if (passOn != nullptr) {
            passOn(level, text, logPassOnData.load(std::memory_order_acquire));
        }
    }

    static int decodeAhead(AddonContext* c) {
        if (!c->aheadAbortHooked) {
            // ggml checks it between the graph's nodes: a step run ahead that nobody will
            // take stops within a fraction of a step (llama_decode answers 2 and takes the
            // step's KV cells back); every other decode runs with it false.
            llama_set_abort_callback(c->ctx, aheadCancelled, &c->aheadCancel);
            c->aheadAbortHooked = true;
        }
        ggml_log_callback logger = nullptr;
        void* loggerData = nullptr;
        llama_log_get(&logger, &loggerData);
        if (logger != logUnlessCancelled) {
            // Set anew whenever node-llama-cpp has set its own since.
            logPassOnData.store(loggerData, std::memory_order_release);
            logPassOn.store(logger, std::memory_order_release);
            llama_log_set(logUnlessCancelled, nullptr);
        }
        cancelHere = &c->aheadCancel;
        const size_t n = c->aheadSeqs.size();
        llama_batch ahead = llama_batch_init(static_cast<int32_t>(n), 0, 1);
        for (size_t i = 0; i < n; i++) {
            common_batch_add(ahead, c->aheadTokens[i], c->aheadPositions[i], { c->aheadSeqs[i] }, true);
        }
        int result = -1;
        try {
            result = llama_decode(c->ctx, ahead);
            if (result == 0) {
                llama_synchronize(c->ctx);
            }
        } catch (...) {
            result = -1;
        }
        cancelHere = nullptr;
        llama_batch_free(ahead);
        return result;
    }

    // Erases the KV cells of the step run ahead (under the mutex, with nothing running on the context).
    static void eraseAhead(AddonContext* c) {
        if (c->ctx == nullptr) {
            return;
        }
        for (size_t i = 0; i < c->aheadSeqs.size(); i++) {
            llama_memory_seq_rm(llama_get_memory(c->ctx), c->aheadSeqs[i], c->aheadPositions[i], -1);
        }
    }

    static std::string decodeFailure(int result) {
        return result == 1 ? "could not find a KV slot for the batch (try reducing the size of the batch or increase the context)" : "Eval has failed";
    }

    static void run() {
        std::vector<llama_seq_id> seqs;
        std::vector<llama_pos> positions;
        std::vector<llama_token> tokens;
        for (;;) {
            waitForStep();
            AddonContext* c = state.owner.load(std::memory_order_acquire);
            state.handed.store(false, std::memory_order_release);
            c->steadyStep->ExecuteThere();
            const llama_batch& batch = c->batch;
            bool goOn = c->steadyArm && !c->steadyStep->failed && oneTokenEach(batch);
            seqs.clear();
            positions.clear();
            if (goOn) {
                for (int32_t i = 0; i < batch.n_tokens; i++) {
                    seqs.push_back(batch.seq_id[i][0]);
                    positions.push_back(batch.pos[i]);
                }
            }
            goOn = goOn && greedyTokens(c, seqs.size(), tokens);
            // Each round: the step just decoded is settled for the JavaScript thread; then,
            // where it was sampled here and no sequence reached its end, the step after it is
            // decoded ahead.
            for (;;) {
                {
                    std::lock_guard<std::mutex> lock(state.mutex);
                    c->aheadState = 0;
                    if (goOn) {
                        c->sampleCached = true;
                        c->cachedSamples = tokens;
                    }
                    c->stepState = 2;
                    for (size_t i = 0; goOn && i < tokens.size(); i++) {
                        goOn = !llama_vocab_is_eog(c->model->vocab, tokens[i]);
                    }
                    if (goOn) {
                        c->aheadState = 1;
                        c->aheadSeqs = seqs;
                        c->aheadPositions = positions;
                        for (llama_pos& position : c->aheadPositions) {
                            position++;
                        }
                        c->aheadTokens = tokens;
                        c->aheadAdopted = false;
                        c->aheadArmed = false;
                    } else {
                        state.owner.store(nullptr, std::memory_order_release);
                    }
                }
                state.settled.notify_all();
                if (!goOn) {
                    break;
                }
                const int result = decodeAhead(c);
                {
                    std::lock_guard<std::mutex> lock(state.mutex);
                    // Set only while it ran (aheadState 1), cleared here: no other decode may see it.
                    c->aheadCancel.store(false, std::memory_order_relaxed);
                    goOn = result == 0 && c->aheadAdopted && c->aheadArmed;
                    if (!goOn) {
                        if (c->aheadAdopted) {
                            c->aheadState = 0;
                            c->stepFailure = result == 0 ? "" : decodeFailure(result);
                            c->stepState = 2;
                        } else if (result == 0) {
                            c->aheadState = 2;
                        } else {
                            c->aheadState = 0;
                            eraseAhead(c);
                        }
                        state.owner.store(nullptr, std::memory_order_release);
                    }
                }
                if (!goOn) {
                    state.settled.notify_all();
                    break;
                }
                // Adopted and asked to run ahead again: sampled here like the first.
                seqs = c->aheadSeqs;
                positions = c->aheadPositions;
                goOn = greedyTokens(c, seqs.size(), tokens);
            }
        }
    }
}

void AddonContext::spindleDropAhead() {
    std::unique_lock<std::mutex> lock(spindleSteady::state.mutex);
    if (aheadState == 1 && !aheadAdopted) {
        // Nobody will take it (this thread asked for something else): stop it where it is.
        aheadCancel.store(true, std::memory_order_relaxed);
    }
    spindleSteady::state.settled.wait(lock, [this] { return aheadState != 1; });
    sampleCached = false;
    if (aheadState == 2) {
        aheadState = 0;
        spindleSteady::eraseAhead(this);
    }
}

Napi::Value AddonContext::DecodeBatchBegin(const Napi::CallbackInfo& info) {
    const bool runAhead = info.Length() > 0 && info[0].IsBoolean() && info[0].As<Napi::Boolean>().Value();
    {
        std::lock_guard<std::mutex> lock(spindleSteady::state.mutex);
        if (stepState != 0) {
            Napi::Error::New(info.Env(), "A step of this context is still running").ThrowAsJavaScriptException();
            return info.Env().Undefined();
        }
        bool same = aheadState != 0 && has_batch && static_cast<size_t>(batch.n_tokens) == aheadSeqs.size();
        for (int32_t i = 0; same && i < batch.n_tokens; i++) {
            same = batch.logits[i] && batch.n_seq_id[i] == 1 && batch.seq_id[i][0] == aheadSeqs[i] && batch.pos[i] == aheadPositions[i] &&
                batch.token[i] == aheadTokens[i];
        }
        if (same) {
            sampleCached = false;
            if (aheadState == 1) {
                aheadAdopted = true;
                aheadArmed = runAhead;
                stepState = 1;
            } else {
                // Decoded already, and nothing since: its logits are the context's last.
                aheadState = 0;
                stepFailure.clear();
                stepState = 2;
            }
            return Napi::Number::New(info.Env(), 2);
        }
    }
    spindleDropAhead();
    AddonContext* none = nullptr;
    if (!spindleSteady::state.owner.compare_exchange_strong(none, this, std::memory_order_acq_rel)) {
        return Napi::Number::New(info.Env(), 0);
    }
    std::call_once(spindleSteady::state.started, [] { std::thread(spindleSteady::run).detach(); });
    steadyStep = new AddonContextDecodeBatchWorker(info.Env(), this);
    steadyArm = runAhead;
    {
        std::lock_guard<std::mutex> lock(spindleSteady::state.mutex);
        stepState = 1;
        spindleSteady::state.handed.store(true, std::memory_order_release);
    }
    spindleSteady::state.wake.notify_one();
    return Napi::Number::New(info.Env(), 1);
}

Napi::Value AddonContext::DecodeBatchEnd(const Napi::CallbackInfo& info) {
    std::unique_lock<std::mutex> lock(spindleSteady::state.mutex);
    if (stepState == 0) {
        lock.unlock();
        Napi::Error::New(info.Env(), "No step of this context was begun").ThrowAsJavaScriptException();
        return info.Env().Undefined();
    }
    spindleSteady::state.settled.wait(lock, [this] { return stepState == 2; });
    stepState = 0;
    AddonContextDecodeBatchWorker* worker = steadyStep;
    steadyStep = nullptr;
    const std::string failure = stepFailure;
    stepFailure.clear();
    lock.unlock();
    if (worker != nullptr) {
        Napi::Promise promise = worker->Settle();
        delete worker;
        return promise;
    }
    Napi::Promise::Deferred settled = Napi::Promise::Deferred::New(info.Env());
    if (failure.empty()) {
        settled.Resolve(info.Env().Undefined());
    } else {
        settled.Reject(Napi::Error::New(info.Env(), failure).Value());
    }
    return settled.Promise();
}

// The sample of a step sampled on the steady thread: the token kept for that output, for a
// plain greedy sampler only (the step after it already ran on that token).
static Napi::Value spindleCachedSample(const Napi::CallbackInfo& info, const std::vector<llama_token>& tokens) {
    Napi::Promise::Deferred settled = Napi::Promise::Deferred::New(info.Env());
    AddonSampler* sampler = Napi::ObjectWrap<AddonSampler>::Unwrap(info[1].As<Napi::Object>());
    const int32_t index = info[0].As<Napi::Number>().Int32Value();
    const bool plain = index >= 0 && static_cast<size_t>(index) < tokens.size() && info.Length() <= 2;
    const llama_token token = plain ? tokens[index] : 0;
    try {
        sampler->rebuildChainIfNeeded();
        if (!plain || !sampler->isPlainGreedy()) {
            settled.Reject(Napi::Error::New(info.Env(), "A step was run ahead of a sample that is not plain greedy").Value());
            return settled.Promise();
        }
        sampler->acceptToken(token);
    } catch (const std::exception& e) {
        settled.Reject(Napi::Error::New(info.Env(), e.what()).Value());
        return settled.Promise();
    }
    settled.Resolve(Napi::Number::New(info.Env(), static_cast<uint32_t>(token)));
    return settled.Promise();
}

Napi::Value AddonContext::DecodeBatchNow(const Napi::CallbackInfo& info) {
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
