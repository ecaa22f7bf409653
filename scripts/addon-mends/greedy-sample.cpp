// Mend 3 of scripts/patch-node-llama-cpp.mjs, put into AddonSampler.cpp before AddonSampler::sample.
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

