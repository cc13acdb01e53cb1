# switchyard runtime image: the release binary (`make build`), the C libraries it
# links and the CA roots, on an empty root: no shell, no package manager, a
# non-root user, nothing written at run time (docs/kubernetes.md, "Image").
# `make image` builds it; BASE only supplies those libraries and roots.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS rootfs
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# rustls reads the system store: TLS to NATS, Redis and exchanges needs the roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates=20230311+deb12u1 \
 && rm -rf /var/lib/apt/lists/*
COPY target/release/switchyard /rootfs/usr/local/bin/switchyard
COPY config/switchyard.toml /rootfs/etc/switchyard/switchyard.toml
# The dynamic loader and every library ldd names, at the paths the binary expects.
RUN ldd /rootfs/usr/local/bin/switchyard \
      | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' \
      | while read -r lib; do mkdir -p "/rootfs$(dirname "$lib")" && cp -L "$lib" "/rootfs$lib"; done \
 && mkdir -p /rootfs/etc/ssl/certs \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ \
 && echo "switchyard:x:65532:65532:switchyard:/nonexistent:/nonexistent" > /rootfs/etc/passwd \
 && echo "switchyard:x:65532:" > /rootfs/etc/group

FROM scratch
COPY --from=rootfs /rootfs /
USER 65532:65532
# Listen on every interface in a container; a mounted config or SWITCHYARD_*
# variables override anything here (SWITCHYARD_CONFIG names the file).
ENV SWITCHYARD_CONFIG=/etc/switchyard/switchyard.toml \
    SWITCHYARD_SERVER__LISTEN=0.0.0.0:8000 \
    SWITCHYARD_FEED__LISTEN=0.0.0.0:8100
# 8000: WebSocket, HTTP API, /healthz, /readyz, /metrics. 8100: `switchyard feed` health and
# metrics. 9100: /metrics when metrics.listen moves it off 8000 (the chart does).
EXPOSE 8000 8100 9100
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["serve"]
