# syntax=docker/dockerfile:1
#
# Spindle on the CPU. Build: docker build -t spindle:cpu .
# The GPU image is Dockerfile.cuda. Both are checked by test/deploy.test.ts (the rules
# hadolint would apply, plus this project's); no Docker daemon runs where they are
# developed, so neither has been built there.
#
# Node: the LTS line the tests run on besides 20 and 22 (package.json "engines").
ARG NODE_IMAGE=node:24-bookworm-slim

# --- build: compile TypeScript to dist/ ------------------------------------------------
FROM ${NODE_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json ./
# npm's postinstall mends node-llama-cpp's check of speculative predictions.
COPY scripts/patch-node-llama-cpp.mjs ./scripts/
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY scripts ./scripts
COPY src ./src
RUN npm run build

# --- deps: production packages only, this platform's CPU engine build only -------------
FROM ${NODE_IMAGE} AS deps
WORKDIR /app
COPY package.json package-lock.json ./
COPY scripts/prune-engine-binaries.mjs scripts/patch-node-llama-cpp.mjs ./scripts/
RUN npm ci --omit=dev --no-audit --no-fund \
 && node scripts/prune-engine-binaries.mjs \
 && npm cache clean --force

# --- runtime ---------------------------------------------------------------------------
FROM ${NODE_IMAGE} AS runtime
ARG VERSION=0.1.0
# The repository URL (--build-arg SOURCE="$(git remote get-url origin)").
ARG SOURCE=""
LABEL org.opencontainers.image.title="spindle" \
      org.opencontainers.image.description="LLM token server over llama.cpp: OpenAI and Anthropic APIs, continuous batching (CPU build)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="UNLICENSED"
ENV NODE_ENV=production \
    SPINDLE_HOST=0.0.0.0 \
    SPINDLE_PORT=8080 \
    SPINDLE_GPU=cpu \
    SPINDLE_STATE_FILE=/app/models/models.state.json
WORKDIR /app
# A user of its own (not root, not the base image's uid 1000), numeric so Kubernetes'
# runAsNonRoot can verify it. Everything it reads is root-owned: the root filesystem
# can be mounted read-only; it writes only to the models volume (downloads, state file).
RUN groupadd --system --gid 10001 spindle \
 && useradd --system --uid 10001 --gid spindle --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin spindle \
 && mkdir -p /app/models \
 && chown spindle:spindle /app/models
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY package.json models.yaml ./
COPY web ./web
VOLUME ["/app/models"]
EXPOSE 8080
USER 10001:10001
STOPSIGNAL SIGTERM
# Liveness only (the process serves); readiness (models loaded and warm) is /readyz.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.SPINDLE_PORT||8080)+'/livez').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
ENTRYPOINT ["node", "dist/launch.cjs"]
