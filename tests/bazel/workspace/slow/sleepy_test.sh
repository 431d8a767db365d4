#!/bin/sh
echo "sleepy_test: started, sleeping past the timeout"
sleep 60
echo "sleepy_test: should have been killed"
