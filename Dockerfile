# Builds the stead binary; the image runs `stead serve`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/stead /usr/local/bin/stead
USER nobody
EXPOSE 8080
ENTRYPOINT ["stead"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
