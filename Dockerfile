# syntax=docker/dockerfile:1
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.7-slim-bookworm
RUN useradd --create-home --uid 10001 worker
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER worker
WORKDIR /home/worker
ENV CW_DEDUP_URL=sqlite:////home/worker/dedup.sqlite3
ENTRYPOINT ["conference-worker"]
CMD ["run"]
