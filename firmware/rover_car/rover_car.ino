// rover_car: the RC car's Arduino (Uno/Nano, ATmega328P). Drives the steering servo and the ESC from the
// runtime's serial commands (protocol: docs/serial-protocol.md, logic in rover_protocol.h) with its own
// failsafe: both outputs go to neutral (1500 us) at boot and whenever no valid command or heartbeat arrived
// within FAILSAFE_TIMEOUT_MS.
//
// Outputs: with the Arduino Servo library available (the Arduino IDE ships it) any pins work. Without it
// (Debian's arduino-core-avr has no Servo library) the sketch drives the pulses itself with Timer1's hardware
// PWM, which only exists on pins 9 (OC1A) and 10 (OC1B) of the ATmega328P; pulses are jitter-free at 0.5 us
// resolution, 50 Hz.

// ---- configuration ----
#define STEERING_PIN 9
#define THROTTLE_PIN 10
#define SERIAL_BAUD 115200
#define FAILSAFE_TIMEOUT_MS 250
#define TELEMETRY_INTERVAL_MS 100
#define HALF_RANGE_US 500        // pulse offset for a full +-1000 command
#define STEER_MIN_US 1000        // the firmware's own limits, applied after the runtime's clamping
#define STEER_MAX_US 2000
#define THROTTLE_MIN_US 1000
#define THROTTLE_MAX_US 2000
// #define ROVER_USE_TIMER1      // force the built-in Timer1 driver even when <Servo.h> exists

#include "rover_protocol.h"

#if !defined(ROVER_USE_TIMER1) && defined(__has_include)
#if __has_include(<Servo.h>)
#define ROVER_USE_SERVO_LIBRARY
#endif
#endif

#ifdef ROVER_USE_SERVO_LIBRARY
#include <Servo.h>
static Servo steering_servo;
static Servo throttle_esc;

static void outputs_begin() {
  steering_servo.attach(STEERING_PIN);
  throttle_esc.attach(THROTTLE_PIN);
}

static void outputs_write(uint16_t steer_us, uint16_t throttle_us) {
  steering_servo.writeMicroseconds(steer_us);
  throttle_esc.writeMicroseconds(throttle_us);
}
#else
#if !defined(__AVR_ATmega328P__) || STEERING_PIN != 9 || THROTTLE_PIN != 10
#error "without the Servo library the outputs must be pins 9 and 10 of an ATmega328P (Timer1 OC1A/OC1B)"
#endif

static void outputs_write(uint16_t steer_us, uint16_t throttle_us) {
  // Timer1 runs at 2 MHz (16 MHz / 8): 2 ticks per microsecond. The compare registers are double-buffered
  // in fast PWM mode, so a new width takes effect at the start of the next 20 ms period.
  OCR1A = steer_us * 2;
  OCR1B = throttle_us * 2;
}

static void outputs_begin() {
  pinMode(STEERING_PIN, OUTPUT);
  pinMode(THROTTLE_PIN, OUTPUT);
  TCCR1A = 0;
  TCCR1B = 0;
  TCNT1 = 0;
  ICR1 = 40000;  // 20 ms period
  outputs_write(ROVER_NEUTRAL_US, ROVER_NEUTRAL_US);
  // Fast PWM, TOP = ICR1 (mode 14), non-inverting on OC1A and OC1B, prescaler 8.
  TCCR1A = _BV(COM1A1) | _BV(COM1B1) | _BV(WGM11);
  TCCR1B = _BV(WGM13) | _BV(WGM12) | _BV(CS11);
}
#endif

static const RoverLimits kLimits = {
    STEER_MIN_US, STEER_MAX_US, THROTTLE_MIN_US, THROTTLE_MAX_US,
    HALF_RANGE_US, FAILSAFE_TIMEOUT_MS, TELEMETRY_INTERVAL_MS,
};
static RoverCore core;
static char reply[ROVER_REPLY_MAX];
static uint16_t written_steer_us = 0, written_throttle_us = 0;

static void apply_outputs() {
  if (core.steer_us != written_steer_us || core.throttle_us != written_throttle_us) {
    outputs_write(core.steer_us, core.throttle_us);
    written_steer_us = core.steer_us;
    written_throttle_us = core.throttle_us;
  }
}

void setup() {
  rover_init(&core, &kLimits, millis());
  outputs_begin();  // neutral from the first pulse: ESCs arm on a steady neutral
  apply_outputs();
  Serial.begin(SERIAL_BAUD);
}

void loop() {
  while (Serial.available() > 0) {
    char c = (char)Serial.read();
    size_t n = rover_feed(&core, c, millis(), reply);
    apply_outputs();  // a command takes effect before its acknowledgement is sent
    if (n > 0) Serial.write(reply, n);
  }
  size_t n = rover_tick(&core, millis(), reply);
  apply_outputs();
  if (n > 0) Serial.write(reply, n);
}
