// A simulated Arduino board (simavr, ATmega328P at 16 MHz) with its bootloader, on a serial port: what a car's
// Uno or Nano is to avrdude and to the runtime. Build: gcc -O2 -I/usr/include/simavr simavr_board.c -lsimavr -lutil
//
// Usage: simavr_board --flash FILE --link PATH [--bootloader HEX --boot-address ADDR [--program HEX]]
//   --flash FILE     the MCU's flash (32768 bytes), kept across runs as a board keeps its program: read at start,
//                    written (a temporary file, fsync, rename) whenever the program changed it. When FILE does
//                    not exist, the board is a new one: erased flash with --bootloader's image written at ADDR.
//   --bootloader HEX the bootloader (Intel hex); it must lie inside the boot section [ADDR, end of flash).
//   --boot-address   where the reset vector points (BOOTRST fuse programmed): 0x7e00 for Optiboot (256 words),
//                    0x7800 for the old Nano's ATmegaBOOT (1024 words). Kept in FILE's sidecar FILE.boot.
//   --program HEX    a new board's program (Intel hex, below the boot section): the sketch someone flashed
//                    before the board was fitted to the car. Without it a new board holds only its bootloader.
//   --link PATH      a symlink to the serial port's device (a pty), replaced atomically.
// Prints "ready <pty>" on stdout once the port exists; diagnostics go to stderr. SIGTERM or SIGINT: the flash is
// saved and the board stops (exit 0).
//
// The serial line, as a USB-serial Arduino behaves:
// - Opening the port resets the MCU (the RESET pin through the auto-reset capacitor, MCUSR.EXTRF), as the kernel
//   raising DTR on open does on a real board, so the bootloader runs for its second and then starts the program.
//   A pty has no modem lines (avrdude's own DTR toggles fail with ENOTTY and it carries on), so the open is the
//   one reset this board sees: the documented equivalent of the auto-reset.
// - While nobody has the port open, what the MCU sends is lost (a USB-serial chip drops it; a pty would keep it
//   for the next opener).
// - Bytes cross intact only when the opener's line speed matches the MCU's UART (UBRR0, U2X0) within 5 %,
//   checked for each byte: a pty would carry them at any speed, a real line garbles them. Here what the MCU
//   sends arrives garbled (each byte another one) and what it would receive is lost (garbage can make a
//   bootloader erase a page). So a wrong upload speed is "not in sync", as on a car. An off UART hears nothing.
// - Simulated time follows the wall clock; the UART takes one byte per byte time at the MCU's baud.
// The boot section is not protected (simavr ignores lock bits): the flashing side refuses images that reach it.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "avr_uart.h"
#include "sim_avr.h"
#include "sim_hex.h"

#define FLASH_SIZE 32768
#define MHZ 16000000UL

static avr_t* avr;
static int master = -1;
static int port_open;      // someone has the pty's slave open
static long host_baud;     // the opener's line speed (its termios), -1 when not a standard one
static int uart_ready = 1;  // the MCU's receive buffer has room
static volatile sig_atomic_t stopping;
static uint8_t saved[FLASH_SIZE];

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void die(const char* fmt, const char* arg) {
  fprintf(stderr, "simavr_board: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\n");
  exit(2);
}

static void on_signal(int sig) {
  (void)sig;
  stopping = 1;
}

// The MCU's UART speed in baud (0 while the UART is off).
static long mcu_baud(void) {
  if (!(avr->data[0xC1] & ((1 << 3) | (1 << 4)))) return 0;  // UCSR0B: neither TXEN0 nor RXEN0
  unsigned ubrr = avr->data[0xC4] | ((unsigned)(avr->data[0xC5] & 0x0F) << 8);
  unsigned divisor = (avr->data[0xC0] & 2) ? 8 : 16;  // UCSR0A.U2X0
  return (long)(MHZ / (divisor * (ubrr + 1)));
}

// Whether a byte crosses the line intact now: both ends at the same speed, within 5 %.
static int speeds_match(void) {
  long mcu = mcu_baud(), diff = host_baud > mcu ? host_baud - mcu : mcu - host_baud;
  return mcu > 0 && host_baud > 0 && diff * 100 <= mcu * 5;
}

static void on_tx(struct avr_irq_t* irq, uint32_t value, void* param) {
  (void)irq;
  (void)param;
  uint8_t byte = speeds_match() ? (uint8_t)value : (uint8_t)(value * 37 + 11);  // garbled: another byte
  if (!port_open) return;  // lost: nobody listens
  if (write(master, &byte, 1) != 1 && errno != EAGAIN) perror("simavr_board: write");
}
static void on_xon(struct avr_irq_t* i, uint32_t v, void* p) {
  (void)i, (void)v, (void)p;
  uart_ready = 1;
}
static void on_xoff(struct avr_irq_t* i, uint32_t v, void* p) {
  (void)i, (void)v, (void)p;
  uart_ready = 0;
}

static long speed_of(speed_t s) {
  switch (s) {
    case B1200: return 1200;
    case B2400: return 2400;
    case B4800: return 4800;
    case B9600: return 9600;
    case B19200: return 19200;
    case B38400: return 38400;
    case B57600: return 57600;
    case B115200: return 115200;
    case B230400: return 230400;
    case B460800: return 460800;
    case B500000: return 500000;
    case B1000000: return 1000000;
    default: return -1;
  }
}

static void save_flash(const char* path) {
  if (memcmp(saved, avr->flash, FLASH_SIZE) == 0) return;
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || write(fd, avr->flash, FLASH_SIZE) != FLASH_SIZE || fsync(fd) != 0 || close(fd) != 0 ||
      rename(tmp, path) != 0) {
    perror("simavr_board: saving the flash");
    return;
  }
  memcpy(saved, avr->flash, FLASH_SIZE);
}

// Writes an Intel hex image into the flash; every byte must lie in [low, high): `what` names the image and
// the range in the error.
static void load_hex(const char* hex, uint32_t low, uint32_t high, const char* what, const char* range) {
  ihex_chunk_p chunks = NULL;
  int n = read_ihex_chunks(hex, &chunks);
  if (n <= 0) {
    char which[200];
    snprintf(which, sizeof which, "%s %s", what, hex);
    die("cannot read the %s (Intel hex)", which);
  }
  for (int i = 0; i < n; i++) {
    uint32_t start = chunks[i].baseaddr, end = chunks[i].baseaddr + chunks[i].size;
    if (start < low || end > high) {
      char where[300];
      snprintf(where, sizeof where, "the %s does not fit: %s: bytes 0x%04x..0x%04x lie outside the %s 0x%04x..0x%04x",
               what, hex, start, end - 1, range, low, high - 1);
      die("%s", where);
    }
    memcpy(avr->flash + start, chunks[i].data, chunks[i].size);
  }
  free_ihex_chunks(chunks);
}

// The flash and the boot address: from FILE (and FILE.boot) when the board exists, else a new board.
static unsigned load_flash(const char* path, const char* hex, const char* boot_arg, const char* program) {
  char boot_path[4096];
  snprintf(boot_path, sizeof boot_path, "%s.boot", path);
  int fd = open(path, O_RDONLY);
  if (fd >= 0) {
    ssize_t n = read(fd, avr->flash, FLASH_SIZE);
    close(fd);
    if (n != FLASH_SIZE) die("%s is not a 32768-byte flash image", path);
    FILE* b = fopen(boot_path, "r");
    unsigned boot = 0;
    if (!b || fscanf(b, "%x", &boot) != 1) die("%s.boot does not hold the boot address", path);
    fclose(b);
    memcpy(saved, avr->flash, FLASH_SIZE);
    return boot;
  }
  if (!hex || !boot_arg) die("%s does not exist: a new board needs --bootloader and --boot-address", path);
  char* end = NULL;
  unsigned long boot = strtoul(boot_arg, &end, 0);
  if (!end || *end || boot >= FLASH_SIZE || boot % 256) die("--boot-address %s: not a boot section start", boot_arg);
  memset(avr->flash, 0xFF, FLASH_SIZE);
  load_hex(hex, (uint32_t)boot, FLASH_SIZE, "bootloader", "boot section");
  if (program) load_hex(program, 0, (uint32_t)boot, "program", "application section");
  FILE* b = fopen(boot_path, "w");
  if (!b || fprintf(b, "0x%04lx\n", boot) < 0 || fclose(b) != 0) die("cannot write %s", boot_path);
  memset(saved, 0xFF, FLASH_SIZE);  // differs from the flash: saved at once
  save_flash(path);
  return (unsigned)boot;
}

static void external_reset(void) {
  avr_reset(avr);
  avr_regbit_set(avr, avr->reset_flags.extrf);
}

int main(int argc, char** argv) {
  const char *flash = NULL, *link_path = NULL, *hex = NULL, *boot_arg = NULL, *program = NULL;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--flash")) flash = argv[i + 1];
    else if (!strcmp(argv[i], "--link")) link_path = argv[i + 1];
    else if (!strcmp(argv[i], "--bootloader")) hex = argv[i + 1];
    else if (!strcmp(argv[i], "--boot-address")) boot_arg = argv[i + 1];
    else if (!strcmp(argv[i], "--program")) program = argv[i + 1];
    else die("unknown option %s", argv[i]);
  }
  if (argc % 2 == 0 || !flash || !link_path) {
    fprintf(stderr,
            "usage: simavr_board --flash FILE --link PATH [--bootloader HEX --boot-address ADDR [--program HEX]]\n");
    return 2;
  }
  avr = avr_make_mcu_by_name("atmega328p");
  if (!avr) die("%s", "simavr has no atmega328p");
  avr_init(avr);
  avr->frequency = MHZ;
  avr->log = LOG_WARNING;
  unsigned boot = load_flash(flash, hex, boot_arg, program);
  avr->codeend = avr->flashend;
  avr->reset_pc = boot;  // BOOTRST programmed
  avr_reset(avr);
  avr_regbit_set(avr, avr->reset_flags.porf);  // power-on: the bootloader starts the program at once

  uint32_t flags = 0;
  avr_ioctl(avr, AVR_IOCTL_UART_GET_FLAGS('0'), &flags);
  flags &= ~(uint32_t)(AVR_UART_FLAG_STDIO | AVR_UART_FLAG_POOL_SLEEP);  // raw bytes; no sleeping on polls
  avr_ioctl(avr, AVR_IOCTL_UART_SET_FLAGS('0'), &flags);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUTPUT), on_tx, NULL);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XON), on_xon, NULL);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XOFF), on_xoff, NULL);
  avr_irq_t* rx = avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_INPUT);

  int slave;
  char name[128];
  if (openpty(&master, &slave, name, NULL, NULL) != 0) die("openpty: %s", strerror(errno));
  struct termios t;
  tcgetattr(slave, &t);
  cfmakeraw(&t);
  cfsetspeed(&t, B9600);
  tcsetattr(slave, TCSANOW, &t);
  close(slave);  // no opener: the master reports POLLHUP until one opens the slave
  fcntl(master, F_SETFL, O_NONBLOCK);
  char tmp_link[4096];
  snprintf(tmp_link, sizeof tmp_link, "%s.tmp", link_path);
  unlink(tmp_link);
  if (symlink(name, tmp_link) != 0 || rename(tmp_link, link_path) != 0) die("cannot link %s", link_path);

  struct sigaction sa = {0};
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  printf("ready %s\n", name);
  fflush(stdout);

  double t0 = now(), last_save = t0;
  uint64_t cycle0 = avr->cycle, next_rx = 0;
  uint8_t in[4096];
  size_t in_len = 0, in_pos = 0;
  long shown_host = -2, shown_mcu = -2;
  unsigned long crashes = 0;
  while (!stopping) {
    struct pollfd p = {master, POLLIN, 0};
    poll(&p, 1, 0);
    int open_now = !(p.revents & POLLHUP);
    if (open_now != port_open) {
      port_open = open_now;
      in_len = in_pos = 0;
      // What the last opener wrote and the MCU has not read yet is gone with it (a pty would hand it to the
      // MCU after the next opener's reset: a bootloader given a runtime's pings jumps to the program).
      if (!port_open) tcflush(master, TCIFLUSH);
      if (port_open) external_reset();
      fprintf(stderr, "simavr_board: port %s\n", port_open ? "opened: reset" : "closed");
    }
    if (port_open) {
      struct termios ht;
      if (tcgetattr(master, &ht) == 0) host_baud = speed_of(cfgetospeed(&ht));  // the opener's settings
      long mcu = mcu_baud();  // logged when the opener's speed changes, or when the MCU's is another
      if (host_baud != shown_host || (mcu != shown_mcu && mcu != 0 && !speeds_match())) {
        fprintf(stderr, "simavr_board: line %ld baud, MCU UART %ld baud%s\n", host_baud, mcu,
                speeds_match() ? "" : ": bytes arrive garbled");
        shown_host = host_baud, shown_mcu = mcu;
      }
      if (in_pos == in_len && (p.revents & POLLIN)) {
        ssize_t n = read(master, in, sizeof in);
        in_pos = 0;
        in_len = n > 0 ? (size_t)n : 0;
      }
    }
    uint64_t target = cycle0 + (uint64_t)((now() - t0) * MHZ);
    if (avr->cycle >= target) {
      usleep(500);
    } else {
      double began = now();
      while (avr->cycle < target && now() - began < 0.002) {  // then look at the port again
        if (in_pos < in_len && uart_ready && avr->cycle >= next_rx) {  // one byte per byte time
          uint8_t byte = in[in_pos++];
          long baud = mcu_baud();
          if (speeds_match()) avr_raise_irq(rx, byte);  // else lost (an off UART hears nothing either)
          next_rx = avr->cycle + MHZ * 10 / (uint64_t)(baud > 0 ? baud : 115200);
        }
        int state = avr_run(avr);
        if (state == cpu_Done || state == cpu_Crashed) {  // a program gone wild: its watchdog would reset it
          if (!crashes++) fprintf(stderr, "simavr_board: the MCU stopped at pc 0x%04x: reset\n", avr->pc);
          external_reset();
        }
      }
    }
    if (now() - last_save > 0.05) {
      save_flash(flash);
      last_save = now();
    }
  }
  save_flash(flash);
  unlink(link_path);
  return 0;
}
