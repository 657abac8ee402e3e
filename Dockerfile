# streamrec: one image for every role (serve, consume, migrate, status).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamrec ./streamrec
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMREC_LOG_FORMAT=json \
    STREAMREC_MEDIA_DIR=/var/lib/streamrec/media
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /var/lib/streamrec --create-home streamrec \
    && install -d -o streamrec -g streamrec /var/lib/streamrec/media
USER streamrec
WORKDIR /var/lib/streamrec
EXPOSE 8080 9100
ENTRYPOINT ["python", "-m", "streamrec"]
CMD ["serve"]
