/* memvisor guest kernel: entry, system call entry, exception stubs, the static IDT and the
 * embedded app image. Ring 0 runs through the host's instruction emulator here, so every path is
 * kept to a handful of instructions. */
#include "../abi.h"

#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_SFMASK 0xc0000084

/* Exceptions that push an error code: 8, 10-14, 17, 21, 29, 30. */
#define ERRCODE_MASK 0x60227d00

/* The 32 exception stubs, 16 bytes apart, at exactly ABI_KERNEL_BASE (the linker script asserts
 * it), so the IDT below can be built statically: stub i is at ABI_KERNEL_BASE + 16 * i. */
        .section .text.isr, "ax"
        .globl isr_stubs, isr_stubs_end
isr_stubs:
        .set vec, 0
        .rept 32
        .balign 16
        .if (ERRCODE_MASK >> vec) & 1
        .else
        pushq $0
        .endif
        pushq $vec
        jmp isr_common
        .set vec, vec + 1
        .endr
        .balign 16
isr_stubs_end:

/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
isr_common:
        movq (%rsp), %rdi
        movq 8(%rsp), %rsi
        movq 16(%rsp), %rdx
        movq %cr2, %rcx
        andq $-16, %rsp
        call kfault /* does not return */

        .section .text.entry, "ax"
        .globl _start
_start:
        movl $kstack_top, %esp
        call kmain /* does not return: ends in enter_user */
1:      hlt
        jmp 1b

/* enter_user(rdi = app rdi, rsi = app rsi, rdx = entry, rcx = user stack) */
        .globl enter_user
enter_user:
        movq %rcx, %rsp
        movq %rdx, %rcx
        movl $2, %r11d /* RFLAGS: interrupts stay off, there is no interrupt controller */
        sysretq

/* syscall: rax = number, rdi, rsi = arguments. rcx = user RIP, r11 = user RFLAGS. */
        .globl syscall_entry
syscall_entry:
        movq %rsp, user_rsp(%rip)
        movl $kstack_top, %esp
        pushq %rcx
        pushq %r11
        movq %rax, %rdx
        call ksyscall
        popq %r11
        popq %rcx
        movq user_rsp(%rip), %rsp
        sysretq

        .section .data.idt, "aw"
        .balign 16
        .globl idt_desc
idt:
        .set vec, 0
        .rept 32
        .word (ABI_KERNEL_BASE + 16 * vec) & 0xffff
        .word ABI_SEL_KCODE
        .byte 0, 0x8e /* present, DPL 0, 64-bit interrupt gate */
        .word ((ABI_KERNEL_BASE + 16 * vec) >> 16) & 0xffff
        .long 0
        .long 0
        .set vec, vec + 1
        .endr
        .balign 8
        .word 0, 0, 0
idt_desc:
        .word 32 * 16 - 1
        .quad idt

/* The app image (objcopy -O binary of guest/app), page aligned at both ends so the kernel can
 * map it in place; the padding after it is zero. */
        .section .app, "aw"
        .balign 4096
        .globl app_blob, app_blob_end
app_blob:
        .incbin "app.bin"
        .balign 4096
app_blob_end:

        .section .bss
        .balign 16
        .globl kstack_top
user_rsp:
        .quad 0
        .balign 4096
kstack:
        .skip 8192
kstack_top:

        .section .note.GNU-stack, "", @progbits
