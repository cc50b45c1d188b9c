#!/usr/bin/env bash
# Starts one Hyperledger Sawtooth 1.2 validator of a PBFT network (docker-compose.yml mounts
# this file read-only into each hyperledger/sawtooth-validator container and runs it with bash).
#
# At first start it creates the validator's key pair in /etc/sawtooth/keys (a named volume) and
# publishes the public key as SHARED_KEYS_DIR/VALIDATOR_NAME.pub (a volume every validator
# mounts; it only ever holds public keys). The genesis validator then waits for every PBFT
# member's public key and writes the genesis batches: settings authorised to its own key, PBFT
# consensus with exactly those members, and the BlockInfo injector with the block validation
# rules that keep one BlockInfo transaction, first in each block, signed by the block's signer.
# Genesis happens once: a marker in the data volume records it, so restarts just start.
#
# Environment:
#   VALIDATOR_NAME      this validator's name, also its host name on the network (required)
#   VALIDATOR_ENDPOINT  address peers reach it at (default tcp://VALIDATOR_NAME:8800)
#   VALIDATOR_PEERS     comma-separated peer endpoints to connect to (static peering)
#   PBFT_GENESIS        1 on exactly one validator: the one that creates the genesis block
#   PBFT_MEMBERS        genesis validator only: the members' names, comma- or space-separated
#                       (at least 4; PBFT needs 3f+1 nodes to tolerate f faulty ones)
#   PBFT_KEY_WAIT_SECONDS  how long the genesis validator waits for the members' keys (600)
#   GENESIS_EXTRA_SETTINGS more KEY=VALUE on-chain settings for genesis, space-separated
#                          (e.g. sawtooth.consensus.pbft.block_publishing_delay=500)
#   SHARED_KEYS_DIR     where public keys are exchanged (default /pbft-shared)
#   VALIDATOR_VERBOSITY -v, -vv or -vvv (default -v)
# Extra arguments are passed to sawtooth-validator.
set -euo pipefail

: "${VALIDATOR_NAME:?set VALIDATOR_NAME to the name of this validator}"
KEY_DIR=/etc/sawtooth/keys
DATA_DIR=/var/lib/sawtooth
SHARED_DIR=${SHARED_KEYS_DIR:-/pbft-shared}
ENDPOINT=${VALIDATOR_ENDPOINT:-tcp://${VALIDATOR_NAME}:8800}
PEERS=${VALIDATOR_PEERS:-}
WAIT_SECONDS=${PBFT_KEY_WAIT_SECONDS:-600}
GENESIS_MARKER="$DATA_DIR/.trustmesh-genesis-created"

log() { printf '%s %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$VALIDATOR_NAME" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
read_key() { tr -d '[:space:]' < "$1"; }

# -- 1. this validator's key pair, created once into the keys volume -----------------------
if [ ! -s "$KEY_DIR/validator.priv" ]; then
    log "first start: creating the validator key pair in $KEY_DIR"
    sawadm keygen --force
fi
chmod 0600 "$KEY_DIR/validator.priv"
own_key=$(read_key "$KEY_DIR/validator.pub")
[[ "$own_key" =~ ^0[23][0-9a-f]{64}$ ]] || die "$KEY_DIR/validator.pub is not a compressed secp256k1 public key"

# -- 2. publish the public key for the genesis validator ------------------------------------
mkdir -p "$SHARED_DIR"
published="$SHARED_DIR/$VALIDATOR_NAME.pub"
if [ -f "$published" ] && [ "$(read_key "$published")" != "$own_key" ]; then
    log "WARNING: $published held another key; this validator's keys volume was recreated." \
        "If the chain already lists the old key in sawtooth.consensus.pbft.members, update that" \
        "setting (sawset proposal create) or this validator cannot take part in consensus."
fi
if [ ! -f "$published" ] || [ "$(read_key "$published")" != "$own_key" ]; then
    tmp=$(mktemp "$SHARED_DIR/.$VALIDATOR_NAME.XXXXXX")
    printf '%s\n' "$own_key" > "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$published"  # atomic: a reader never sees half a key
    log "published public key $own_key"
fi

# -- 3. genesis, on the genesis validator, once -----------------------------------------------
if [ "${PBFT_GENESIS:-0}" = 1 ] && [ ! -e "$GENESIS_MARKER" ]; then
    if compgen -G "$DATA_DIR/block-*.lmdb" >/dev/null; then
        log "a chain already exists in $DATA_DIR: not creating genesis again"
    else
        read -r -a members <<< "${PBFT_MEMBERS//,/ }"
        [ "${#members[@]}" -ge 4 ] || die "PBFT needs at least 4 members, PBFT_MEMBERS='${PBFT_MEMBERS:-}'"
        [ "$(printf '%s\n' "${members[@]}" | sort -u | wc -l)" -eq "${#members[@]}" ] \
            || die "PBFT_MEMBERS names a validator twice: ${PBFT_MEMBERS}"
        log "waiting for the public keys of ${members[*]} in $SHARED_DIR"
        waited=0
        while :; do
            missing=()
            for name in "${members[@]}"; do
                [ -s "$SHARED_DIR/$name.pub" ] || missing+=("$name")
            done
            [ "${#missing[@]}" -eq 0 ] && break
            [ "$waited" -lt "$WAIT_SECONDS" ] || die "no public key from ${missing[*]} after ${WAIT_SECONDS}s"
            if [ $((waited % 15)) -eq 0 ]; then log "still waiting for ${missing[*]}"; fi
            sleep 1
            waited=$((waited + 1))
        done
        keys=()
        for name in "${members[@]}"; do
            key=$(read_key "$SHARED_DIR/$name.pub")
            [[ "$key" =~ ^0[23][0-9a-f]{64}$ ]] || die "$SHARED_DIR/$name.pub is not a public key"
            keys+=("\"$key\"")
        done
        [ "$(printf '%s\n' "${keys[@]}" | sort -u | wc -l)" -eq "${#keys[@]}" ] \
            || die "two PBFT members share a public key"
        member_list="[$(IFS=,; echo "${keys[*]}")]"
        read -r -a extra_settings <<< "${GENESIS_EXTRA_SETTINGS:-}"

        work=$(mktemp -d)
        sawset genesis --key "$KEY_DIR/validator.priv" --output "$work/config-genesis.batch"
        sawset proposal create --key "$KEY_DIR/validator.priv" --output "$work/config-consensus.batch" \
            sawtooth.consensus.algorithm.name=pbft \
            sawtooth.consensus.algorithm.version=1.0 \
            "sawtooth.consensus.pbft.members=$member_list" \
            sawtooth.validator.batch_injectors=block_info \
            "sawtooth.validator.block_validation_rules=NofX:1,block_info;XatY:block_info,0;local:0" \
            ${extra_settings[@]+"${extra_settings[@]}"}
        sawadm genesis "$work/config-genesis.batch" "$work/config-consensus.batch"
        rm -rf "$work"
        log "genesis batch written: PBFT 1.0 with ${#members[@]} members (${members[*]}), BlockInfo injector"
    fi
    touch "$GENESIS_MARKER"
fi

# -- 4. the validator ------------------------------------------------------------------------
args=(
    "${VALIDATOR_VERBOSITY:--v}"
    --endpoint "$ENDPOINT"
    --bind component:tcp://0.0.0.0:4004
    --bind consensus:tcp://0.0.0.0:5050
    --bind network:tcp://0.0.0.0:8800
    --peering static
    --scheduler parallel
    --maximum-peer-connectivity 255
)
if [ -n "$PEERS" ]; then
    args+=(--peers "$PEERS")
fi
log "starting sawtooth-validator, endpoint $ENDPOINT, peers ${PEERS:-none (they connect to it)}"
exec sawtooth-validator "${args[@]}" "$@"
