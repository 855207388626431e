#!/bin/sh
# Starts one Redis Sentinel. Used by deploy/compose.yaml and, as the same text, by
# deploy/k8s/redis.yaml (tests/unit/test_deploy.py checks that the two stay the same).
#
# Sentinel rewrites its config file as it learns (the replicas, the other Sentinels, a new primary
# after a failover), so it cannot run on the read-only template: the template is copied to
# SENTINEL_CONF on the first start only. A Sentinel restarted with its data directory keeps what
# it learned; one started afresh learns the current primary from the others' hello messages.
#
#   SENTINEL_TEMPLATE  the read-only template (deploy/redis/sentinel.conf, or the ConfigMap's)
#   SENTINEL_CONF      the working copy; default /data/sentinel.conf
#   SENTINEL_SELF      this Sentinel's name, as the others and the clients reach it
#   REDIS_MASTER_NAME  the name the template monitors (the stages' MAILPIPE_REDIS_MASTER)
#   REDIS_PASSWORD     optional: the Redis servers' password (hex or letters, written unquoted)
set -eu

: "${SENTINEL_CONF:=/data/sentinel.conf}"

if [ ! -s "$SENTINEL_CONF" ]; then
    # The template monitors its primary by name, and Sentinel refuses to start on a name it
    # cannot resolve: wait (up to 2 minutes) for that server to exist.
    primary=$(awk '$1 == "sentinel" && $2 == "monitor" { print $4 }' "$SENTINEL_TEMPLATE")
    tries=0
    until getent hosts "$primary" >/dev/null; do
        tries=$((tries + 1))
        if [ "$tries" -ge 120 ]; then
            echo "sentinel-start: $primary does not resolve" >&2
            exit 1
        fi
        sleep 1
    done
    umask 077  # the copy may hold the password
    cp "$SENTINEL_TEMPLATE" "$SENTINEL_CONF"
    echo "sentinel announce-ip $SENTINEL_SELF" >> "$SENTINEL_CONF"
    if [ -n "${REDIS_PASSWORD:-}" ]; then
        echo "sentinel auth-pass $REDIS_MASTER_NAME $REDIS_PASSWORD" >> "$SENTINEL_CONF"
    fi
fi

# The image's entrypoint: as root it hands the data directory to the redis user and drops to it.
exec docker-entrypoint.sh redis-server "$SENTINEL_CONF" --sentinel
