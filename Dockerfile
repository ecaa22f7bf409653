# A CPU image of the server: a build stage compiles TypeScript; the runtime stage has the
# production dependencies and the compiled server only.
FROM node:22-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY scripts ./scripts
COPY src ./src
RUN npm run build

FROM node:22-bookworm-slim
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund
COPY --from=build /app/dist ./dist
COPY models.yaml ./
COPY web ./web
# Models live in a volume; a missing one is fetched from its sources on start.
VOLUME /app/models
# Promotions, canary weights and the hashes versions were first served with live in the
# volume too, so they survive a new container.
ENV SPINDLE_HOST=0.0.0.0 SPINDLE_PORT=8080 SPINDLE_STATE_FILE=/app/models/models.state.json
EXPOSE 8080
CMD ["node", "dist/launch.cjs"]
