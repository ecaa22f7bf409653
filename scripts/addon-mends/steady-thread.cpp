// Mend 4 of scripts/patch-node-llama-cpp.mjs, put into AddonContext.cpp before AddonContext::DecodeBatchNow.
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

    // What a plain greedy sampler picks from output `i` of the step just decoded (mend 3's rule).
    static bool greedyToken(AddonContext* c, int32_t i, llama_token& token) {
        float logit;
        return AddonSampler::firstMaxToken(c->ctx, c->model->vocab, i, token, logit);
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

