#!/bin/sh
# The --tool-exec command of the CLI's tool-calling test (tests/run.sh): reads the call's JSON
# {"name":...,"arguments":{...}} from stdin; get_weather returns data, cancel_order fails (exit 3).
read -r call
case "$call" in
  '{"name":"get_weather","arguments":{'*) echo '{"sky":"clear","celsius":21}' ;;
  *) echo "order database offline"; exit 3 ;;
esac
