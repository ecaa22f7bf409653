// Mend 5 of scripts/patch-node-llama-cpp.mjs, put into AddonSampler.cpp before AddonSampler's constructor.
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

// A spare array of at least `size` entries, else a new one.
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

// Keeps the array for the next sampler, up to spindleSpareMaxBytes in all; `from` is left empty.
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

