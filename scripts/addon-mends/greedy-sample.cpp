// Mend 3 of scripts/patch-node-llama-cpp.mjs, put into AddonSampler.cpp before AddonSampler::sample.
// Temperature 0 and nothing else in the chain: the greedy sampler alone.
bool AddonSampler::isPlainGreedy() const {
    return !disposed && greedySampler != nullptr && tokenBiasSampler == nullptr && repeatPenaltySampler == nullptr &&
        dryRepeatPenaltySampler == nullptr && xtcSampler == nullptr &&
        (grammarEvaluationState == nullptr || grammarEvaluationState->sampler == nullptr);
}

// What llama_sampler_greedy_apply does to the full candidate array of output `i` (the first
// of the highest logits), read from the logits themselves; false where there are no plain
// logits. The steady thread samples the steps it runs ahead with it too (mend 4).
bool AddonSampler::firstMaxToken(struct llama_context* llamaContext, const llama_vocab* vocab, int32_t i, llama_token& token, float& logit) {
    if (llama_get_sampled_probs_ith(llamaContext, i) != nullptr || llama_get_sampled_logits_ith(llamaContext, i) != nullptr) {
        return false;
    }

    const float* logits = llama_get_logits_ith(llamaContext, i);
    const int32_t vocabLength = llama_vocab_n_tokens(vocab);
    if (logits == nullptr || vocabLength <= 0) {
        return false;
    }

    token = 0;
    logit = logits[0];
    for (llama_token tokenId = 1; tokenId < vocabLength; tokenId++) {
        if (logits[tokenId] > logit) {
            logit = logits[tokenId];
            token = tokenId;
        }
    }
    return true;
}

bool AddonSampler::sampleGreedy(struct llama_context* llamaContext, int32_t batchLogitIndex, llama_token_data_array& curP) {
    llama_token best;
    float bestLogit;
    if (!firstMaxToken(llamaContext, model->vocab, batchLogitIndex, best, bestLogit)) {
        return false;
    }

    tokenCandidates[0] = llama_token_data { best, bestLogit, 0.0f };
    curP.data = tokenCandidates.data();
    curP.size = 1;
    curP.selected = 0;
    curP.sorted = false;
    return true;
}

