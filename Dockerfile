# A CPU image of the server. GPU images: build on a CUDA base and run with --gpu cuda.
FROM node:20-bookworm-slim
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund
COPY tsconfig.json models.yaml ./
COPY src ./src
COPY web ./web
# Models live in a volume; a missing one is fetched from its sources on start.
VOLUME /app/models
# Promotions, canary weights and the hashes versions were first served with live in the
# volume too, so they survive a new container.
ENV SPINDLE_HOST=0.0.0.0 SPINDLE_PORT=8080 SPINDLE_STATE_FILE=/app/models/models.state.json
EXPOSE 8080
CMD ["node", "src/launch.cjs"]
