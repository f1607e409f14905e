#!/bin/sh
# Starts rabbitmq-server with one account, ctpipe's, whose password comes from the environment
# (a Kubernetes Secret), never from the image. The config is written to RABBITMQ_CONFIG_DIR (an
# emptyDir: the root file system stays read-only); logs go to the console (kubectl logs).
set -eu
: "${RABBITMQ_DEFAULT_USER:=ctpipe}"
: "${RABBITMQ_DEFAULT_PASS:?set RABBITMQ_DEFAULT_PASS (the Secret key amqp-password)}"
: "${RABBITMQ_CONFIG_DIR:=/tmp/rabbitmq}"
mkdir -p "$RABBITMQ_CONFIG_DIR"
umask 077
cat > "$RABBITMQ_CONFIG_DIR/rabbitmq.conf" <<CONF
default_user = $RABBITMQ_DEFAULT_USER
default_pass = $RABBITMQ_DEFAULT_PASS
default_vhost = /
loopback_users = none
log.console = true
log.console.level = info
log.file = false
CONF
printf '[].\n' > "$RABBITMQ_CONFIG_DIR/enabled_plugins"
unset RABBITMQ_DEFAULT_PASS  # not in the Erlang VM's environment
export RABBITMQ_CONFIG_FILE="$RABBITMQ_CONFIG_DIR/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$RABBITMQ_CONFIG_DIR/enabled_plugins" \
    RABBITMQ_CONF_ENV_FILE="$RABBITMQ_CONFIG_DIR/rabbitmq-env.conf" \
    RABBITMQ_LOG_BASE="$RABBITMQ_CONFIG_DIR/log" \
    RABBITMQ_PID_FILE="$RABBITMQ_CONFIG_DIR/rabbitmq.pid"
exec rabbitmq-server
