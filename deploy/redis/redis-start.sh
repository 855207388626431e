#!/bin/sh
# Starts one Redis server of a Sentinel-watched group, as the primary or as a replica of the
# primary the Sentinels name. Used by deploy/compose.yaml and, as the same text, by
# deploy/k8s/redis.yaml (tests/unit/test_deploy.py checks that the two stay the same).
#
# A Redis that restarts must not decide on its own that it is the primary: after a failover
# the Sentinels have promoted another server, and a second primary would take grants and claims
# that the others never see. So it asks the Sentinels first, and goes with what most of those
# that answer say. Only when none of them names a primary (the group's very first start) does
# REDIS_INITIAL_PRIMARY start as the primary, and the others as its replicas.
#
#   REDIS_SELF             this server's name, as the others and the Sentinels reach it
#   REDIS_INITIAL_PRIMARY  the primary when no Sentinel knows one yet (the Sentinels' template
#                          monitors the same name)
#   REDIS_SENTINELS        host:port,host:port,... (the stages' MAILPIPE_REDIS_SENTINELS)
#   REDIS_MASTER_NAME      the name the Sentinels monitor (the stages' MAILPIPE_REDIS_MASTER)
#   REDIS_PASSWORD         optional: the password clients and replicas give (hex or letters:
#                          it is written into the config file unquoted)
#   REDIS_CONF             where to write the config file (writable: Sentinel has the server
#                          rewrite it when it reconfigures it); default /data/redis.conf
#   REDIS_MAXMEMORY        optional: maxmemory (e.g. 1gb), below the container's memory limit
set -eu

: "${REDIS_CONF:=/data/redis.conf}"
: "${REDIS_PORT:=6379}"

# Every Sentinel's answer, "host port" per line; the most frequent one wins (a Sentinel that was
# itself just restarted may still hold its template's primary until the others' hellos reach it).
answers=""
for sentinel in $(echo "$REDIS_SENTINELS" | tr ',' ' '); do
    host=${sentinel%:*}
    port=${sentinel##*:}
    # The Sentinels have no password: ask without the servers' (REDISCLI_AUTH, for the probes).
    reply=$(env -u REDISCLI_AUTH timeout 3 redis-cli --raw -h "$host" -p "$port" \
        SENTINEL get-master-addr-by-name "$REDIS_MASTER_NAME" 2>/dev/null || true)
    primary_host=$(printf '%s\n' "$reply" | sed -n 1p)
    primary_port=$(printf '%s\n' "$reply" | sed -n 2p)
    case "$primary_port" in
        '' | *[!0-9]*) continue ;;  # no answer, no such master, or an error text
    esac
    answers="$answers$primary_host $primary_port
"
done
primary=$(printf '%s' "$answers" | sed '/^$/d' | sort | uniq -c | sort -rn | sed -n '1s/^ *[0-9]* //p')

if [ -n "$primary" ]; then
    primary_host=${primary% *}
    primary_port=${primary#* }
    echo "redis-start: the Sentinels name $primary_host:$primary_port as the primary" >&2
elif [ "$REDIS_SELF" = "$REDIS_INITIAL_PRIMARY" ]; then
    primary_host=$REDIS_SELF
    primary_port=$REDIS_PORT
    echo "redis-start: no Sentinel names a primary: starting as the initial primary" >&2
else
    primary_host=$REDIS_INITIAL_PRIMARY
    primary_port=$REDIS_PORT
    echo "redis-start: no Sentinel names a primary: replicating the initial primary" >&2
fi

umask 077  # the file may hold the password
{
    echo "port $REDIS_PORT"
    echo "dir $(dirname "$REDIS_CONF")"
    # Known by name, not address: a restarted container or pod keeps its name, not its address
    # (the Sentinels run with resolve-hostnames and announce-hostnames).
    echo "replica-announce-ip $REDIS_SELF"
    # fsync before every reply: a grant or claim that a client was told about survives a restart
    # of the primary that comes before the Sentinels' failover (a restarted primary's replica
    # resynchronises from it, so what its file lacks is lost on both).
    echo "appendonly yes"
    echo "appendfsync always"
    # Never evict: an evicted grant, claim or sent mark would break the rate or the one holder.
    # A full Redis refuses writes instead, and the stages fail closed.
    echo "maxmemory-policy noeviction"
    if [ -n "${REDIS_MAXMEMORY:-}" ]; then
        echo "maxmemory $REDIS_MAXMEMORY"
    fi
    # Reached over the network by design; REDIS_PASSWORD protects it where one is set.
    echo "protected-mode no"
    if [ -n "${REDIS_PASSWORD:-}" ]; then
        echo "requirepass $REDIS_PASSWORD"
        echo "masterauth $REDIS_PASSWORD"
    fi
    if [ "$primary_host" != "$REDIS_SELF" ]; then
        echo "replicaof $primary_host $primary_port"
    fi
} > "$REDIS_CONF"

# The image's entrypoint: as root it hands the data directory to the redis user and drops to it;
# as any other user it starts redis-server directly.
exec docker-entrypoint.sh redis-server "$REDIS_CONF"
