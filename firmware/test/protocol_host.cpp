// Host-side driver for the sketch's protocol core (../rover_car/rover_protocol.h), compiled with g++ and
// driven by tests/unit/test_protocol.py with tests/vectors/serial_protocol.json. One command per stdin line:
//   crc <hex bytes or ->        -> "XX"            CRC-8 of the bytes
//   us <milli>                  -> "<us>"          pulse width for a command value (default half range)
//   accept <hex bytes>          -> "ok" | "bad"    does a freshly booted core accept this line?
//   step <at_ms> <hex bytes|->  -> output lines, then "."   feed bytes + '\n' (unless "-"), then one tick
//   boot <at_ms> <rc_receiver>  -> (nothing)       a fresh core, with (1) or without (0) an RC receiver
//   rc <at_ms> <steer> <throttle> <switch>  -> (nothing)   pulse widths measured on the receiver channels
//   sensors <wheel_mmps> <battery_mv>       -> (nothing)   sensor readings (and the sensors count as fitted)
// Bytes are hex-encoded so that CR, '*' and spaces survive the transport.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../rover_car/rover_protocol.h"

static const RoverLimits kDefaults = {1000, 2000, 1000, 2000, 500, 250, 100, 0, 100, 0};

static size_t unhex(const char* text, char* out, size_t cap) {
  size_t n = 0;
  if (strcmp(text, "-") == 0) return 0;
  for (const char* p = text; p[0] && p[1] && n < cap; p += 2) {
    char pair[3] = {p[0], p[1], 0};
    out[n++] = (char)strtol(pair, NULL, 16);
  }
  return n;
}

int main() {
  RoverCore core;
  rover_init(&core, &kDefaults, 0);
  char line[512], bytes[256], out[ROVER_TICK_MAX];
  while (fgets(line, sizeof line, stdin)) {
    line[strcspn(line, "\n")] = 0;
    char* cmd = strtok(line, " ");
    if (!cmd) continue;
    if (strcmp(cmd, "crc") == 0) {
      char* arg = strtok(NULL, " ");
      size_t n = unhex(arg ? arg : "-", bytes, sizeof bytes);
      printf("%02X\n", rover_crc8(bytes, n));
    } else if (strcmp(cmd, "us") == 0) {
      printf("%ld\n", rover_milli_to_us(strtol(strtok(NULL, " "), NULL, 10), kDefaults.half_range_us));
    } else if (strcmp(cmd, "accept") == 0) {
      RoverCore fresh;
      rover_init(&fresh, &kDefaults, 0);
      size_t n = unhex(strtok(NULL, " "), bytes, sizeof bytes);
      for (size_t i = 0; i < n; i++) rover_feed(&fresh, bytes[i], 0, out);
      rover_feed(&fresh, '\n', 0, out);
      printf("%s\n", fresh.rx_ok == 1 && fresh.rx_bad == 0 ? "ok" : "bad");
    } else if (strcmp(cmd, "step") == 0) {
      uint32_t now = (uint32_t)strtoul(strtok(NULL, " "), NULL, 10);
      char* arg = strtok(NULL, " ");
      if (arg && strcmp(arg, "-") != 0) {
        size_t n = unhex(arg, bytes, sizeof bytes);
        for (size_t i = 0; i <= n; i++) {
          if (rover_feed(&core, i < n ? bytes[i] : '\n', now, out)) fputs(out, stdout);
        }
      }
      if (rover_tick(&core, now, out)) fputs(out, stdout);
      printf(".\n");
    } else if (strcmp(cmd, "boot") == 0) {
      uint32_t now = (uint32_t)strtoul(strtok(NULL, " "), NULL, 10);
      RoverLimits limits = kDefaults;
      limits.rc_receiver = (uint8_t)atoi(strtok(NULL, " "));
      rover_init(&core, &limits, now);
    } else if (strcmp(cmd, "rc") == 0) {
      uint32_t now = (uint32_t)strtoul(strtok(NULL, " "), NULL, 10);
      for (uint8_t ch = 0; ch < ROVER_RC_CHANNELS; ch++) {
        rover_rc_pulse(&core, ch, (uint16_t)atoi(strtok(NULL, " ")), now);
      }
    } else if (strcmp(cmd, "sensors") == 0) {
      core.wheel_mmps = (uint16_t)atoi(strtok(NULL, " "));
      core.battery_mv = (uint16_t)atoi(strtok(NULL, " "));
      core.limits.sensors = ROVER_FEATURE_WHEEL | ROVER_FEATURE_BATTERY;
    } else {
      fprintf(stderr, "unknown command %s\n", cmd);
      return 2;
    }
    fflush(stdout);
  }
  return 0;
}
