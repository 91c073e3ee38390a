/* memvisor guest app: header and entry. The kernel enters at _start in ring 3 (IRETQ) with
 * rdi = truth bitmap base and rsi = words per bitmap. */
#include "../abi.h"

        .section .header, "a"
        .quad APP_MAGIC
        .quad _start
        .quad __file_end
        .quad __bss_end

        .text
        .globl _start
_start:
        movl $stack_top, %esp
        xorl %ebp, %ebp
        call app_main
        movl $SYS_EXIT, %eax
        int3
1:      jmp 1b

        .section .bss
        .balign 16
stack:
        .skip APP_STACK_SIZE
stack_top:

        .section .note.GNU-stack, "", @progbits
