/* startup.c: the smallest start-up a Cortex-M4 program needs under QEMU's mps2-an386 board.
 *
 * At reset the core loads SP from word 0 and jumps to the address in word 1 of the vector table
 * (ARMv7-M ARM, B1.5.3).  Reset_Handler sets up C's memory (.data from flash, .bss zeroed; the
 * symbols come from mps2_an386.ld), opens newlib's semihosting stdio (librdimon), calls main and
 * ends the emulation with semihosting SYS_EXIT, so QEMU itself exits: status 0 when main returned
 * 0, 1 otherwise.  A fault or an unexpected exception prints its name and ends the run the same
 * way instead of hanging.
 */
#include <stdint.h>
#include <stdio.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;   /* from the linker script */
extern void initialise_monitor_handles(void);                    /* librdimon: stdin/out/err */
int main(void);

/* ARM semihosting call (ARM IHI 0045 / "Semihosting for AArch32 and AArch64"): operation in r0,
   argument in r1, BKPT 0xAB on M-profile; the debugger (here QEMU -semihosting) does the work. */
static int semihost(int op, uintptr_t arg)
{
    register int r0 __asm__("r0") = op;
    register uintptr_t r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

#define SYS_EXIT 0x18
#define ADP_STOPPED_APPLICATION_EXIT 0x20026u   /* QEMU exits with status 0 */
#define ADP_STOPPED_RUNTIME_ERROR 0x20023u      /* any other reason: QEMU exits with status 1 */

static void __attribute__((noreturn)) semihost_exit(int status)
{
    fflush(stdout);
    /* AArch32 SYS_EXIT takes the reason itself in r1 (not a parameter block). */
    semihost(SYS_EXIT, status == 0 ? ADP_STOPPED_APPLICATION_EXIT : ADP_STOPPED_RUNTIME_ERROR);
    for (;;)
        ;                                      /* not reached under QEMU */
}

void Reset_Handler(void)
{
    uint32_t *src = &_sidata, *dst;
    for (dst = &_sdata; dst < &_edata;)
        *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss;)
        *dst++ = 0;
    initialise_monitor_handles();
    semihost_exit(main());
}

static void fault(const char *name)
{
    printf("FAULT %s\n", name);
    semihost_exit(1);
}

static void NMI_Handler(void) { fault("NMI"); }
static void HardFault_Handler(void) { fault("HardFault"); }
static void MemManage_Handler(void) { fault("MemManage"); }
static void BusFault_Handler(void) { fault("BusFault"); }
static void UsageFault_Handler(void) { fault("UsageFault"); }
static void Other_Handler(void) { fault("unexpected exception"); }
/* A program may count SysTick wraps (harness.c does) by defining SysTick_Handler itself. */
void SysTick_Handler(void) __attribute__((weak, alias("Other_Handler")));

/* The 16 system entries of the ARMv7-M vector table (no external interrupts are enabled). */
__attribute__((section(".isr_vector"), used))
void (*const vector_table[16])(void) = {
    (void (*)(void))(uintptr_t)&_estack,   /* 0: initial main stack pointer */
    Reset_Handler,                         /* 1 */
    NMI_Handler,                           /* 2 */
    HardFault_Handler,                     /* 3 */
    MemManage_Handler,                     /* 4 */
    BusFault_Handler,                      /* 5 */
    UsageFault_Handler,                    /* 6 */
    0, 0, 0, 0,                            /* 7-10: reserved */
    Other_Handler,                         /* 11: SVCall */
    Other_Handler,                         /* 12: DebugMonitor */
    0,                                     /* 13: reserved */
    Other_Handler,                         /* 14: PendSV */
    SysTick_Handler,                       /* 15: SysTick */
};
